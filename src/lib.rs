//! infusion-repl: customize Stable Diffusion 1.5 with the Infusion method.
//!
//! The library is layered, dependencies pointing down only:
//! - [`app`]: the front ends (command line, REPL, Rhai bindings, benchmark);
//! - [`metrics`]: the paper's overfitting measures and scores;
//! - [`infusion`]: the method (concepts, prompts, generation, training, attention maps);
//! - [`sd`]: the SD1.x model and pipeline, which names no method;
//! - [`util`], [`error`], [`job`]: small shared pieces.

pub mod app;
pub mod assets;
mod error;
pub mod infusion;
pub mod job;
pub mod metrics;
pub mod sd;
pub mod util;

pub use error::{Error, Result, WeightProblem};
pub use infusion::concept::Concept;
pub use infusion::generate::{generate_infusion, ConceptSet, InfusionGeneration, InfusionOptions};
pub use job::Job;
pub use sd::attention::{
    AttentionCall, AttentionHook, AttnKind, AttnSite, BatchLayout, Guidance, HookCtx, LayerInfo,
    Row, Step, Stream,
};
pub use sd::pipeline::{GenerateOptions, Generation, LoadOptions, StableDiffusion};
