//! The front ends: the command line, the REPL, the Rhai bindings and the benchmark. Each is a
//! thin adapter over the library; nothing below this folder imports it.

pub mod bench;
pub mod cli;
pub mod repl;
pub mod script;
pub mod signals;
pub mod stdout;
