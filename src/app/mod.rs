//! The front ends: the command line, the REPL, the Rhai bindings and the benchmark. Each is a
//! thin adapter over the library; nothing below this folder imports it.

pub(crate) mod bench;
pub(crate) mod cli;
pub(crate) mod repl;
pub(crate) mod script;
pub(crate) mod signals;
pub(crate) mod stdout;

// What the tests, the binary and a library user reach (the files are the crate's own).
pub use bench::{run as run_bench, BenchOptions};
pub use cli::run;
pub use script::api::images::Img;
pub use script::{build_engine, describe, error_kind, rt, ScriptConfig, Session, Thrown};
