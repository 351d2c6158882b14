//! infusion-repl: customize Stable Diffusion 1.5 with the Infusion method, beside the paper's
//! baselines.
//!
//! The library is layered, dependencies pointing down only (tests/integration/layering.rs holds
//! the table):
//! - [`app`]: the front ends (command line, REPL, Rhai bindings, benchmark);
//! - [`compare`]: the paper's comparison of the methods, resumable and sharded;
//! - [`actions`]: one library call per user action (load a model, train, load a concept);
//! - [`toy`]: the paper's 2-D overfitting lab;
//! - [`metrics`]: the paper's overfitting measures and scores;
//! - [`customize`]: F beside C for concepts of any method (prompts, the session's concepts,
//!   generation, C's noise prediction);
//! - [`methods`]: every method behind one seam (Infusion's mechanics are in [`infusion`]);
//! - [`infusion`]: the paper's method (concepts, its hook, training, attention maps);
//! - [`train`]: the training loop, data and optimizer every method shares;
//! - [`sd`]: the SD1.x model and pipeline, which names no method;
//! - [`util`], [`error`], [`job`], [`assets`]: small shared pieces.
//!
//! Each room's files are the crate's own (`pub(crate)`); what the binary, the tests and a
//! library user reach is what each room's `mod.rs` re-exports, and the items below. Anything
//! else the crate stops using, the compiler reports as dead.
//!
//! The documentation is for the crate's developers too, so it links to private items.
#![allow(rustdoc::private_intra_doc_links)]

pub mod actions;
pub mod app;
pub mod assets;
pub mod compare;
pub mod customize;
mod error;
pub mod infusion;
pub mod job;
pub mod methods;
pub mod metrics;
pub mod sd;
pub mod toy;
pub mod train;
pub mod util;

pub use customize::generate::{generate_pair, PairGeneration, PairOptions};
pub use customize::set::ConceptSet;
pub use error::{Error, ErrorKind, Result, WeightProblem};
pub use infusion::concept::Concept;
pub use infusion::Stream;
pub use job::Job;
pub use sd::attention::{AttentionCall, AttnKind, LayerInfo};
pub use sd::hook::{
    AttentionHook, AttnSite, BatchLayout, Branch, Guidance, HookCtx, Projection, Row, Step,
};
pub use sd::pipeline::{GenerateOptions, Generation, LoadOptions, StableDiffusion};
