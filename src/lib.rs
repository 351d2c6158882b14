//! infusion-repl: customize Stable Diffusion 1.5 with the Infusion method.
//!
//! The library is layered, dependencies pointing down only:
//! - [`app`]: the front ends (command line, REPL, Rhai bindings, benchmark);
//! - [`metrics`]: the paper's overfitting measures and scores;
//! - [`infusion`]: the method (concepts, prompts, generation, training, attention maps);
//! - [`sd`]: the SD1.x model and pipeline, which names no method;
//! - [`util`], [`error`], [`job`]: small shared pieces.

pub mod actions;
pub mod app;
pub mod assets;
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
pub use error::{Error, Result, WeightProblem};
pub use infusion::concept::Concept;
pub use infusion::Stream;
pub use job::Job;
pub use sd::attention::{AttentionCall, AttnKind, LayerInfo};
pub use sd::hook::{
    AttentionHook, AttnSite, BatchLayout, Branch, Guidance, HookCtx, Projection, Row, Step,
};
pub use sd::pipeline::{GenerateOptions, Generation, LoadOptions, StableDiffusion};
