//! infusion: customize Stable Diffusion 1.5 with the Infusion method.
//!
//! This crate holds the SD1.x pipeline on candle (tokenizer, CLIP text encoder, UNet with an
//! attention hook, VAE, DDIM), model loading from diffusers folders and the Hugging Face cache,
//! and the `infusion-repl` command line.

pub mod attention;
pub mod attention_maps;
pub mod bench;
pub mod cli;
pub mod concept;
pub mod config;
pub mod device_mem;
mod error;
pub mod fused;
pub mod hub;
pub mod image_io;
pub mod infusion;
pub mod job;
pub mod metrics;
mod nn;
pub mod pipeline;
pub mod prompt;
pub mod repl;
pub mod scheduler;
pub mod script;
pub mod text_encoder;
pub mod text_render;
pub mod tokenizer;
pub mod train;
pub mod unet;
pub mod vae;
pub mod weights;

pub use attention::{
    AttentionCall, AttentionHook, AttnKind, AttnSite, BatchLayout, Guidance, HookCtx, LayerInfo,
    Row, Step, Stream,
};
pub use concept::Concept;
pub use error::{Error, Result, WeightProblem};
pub use infusion::{generate_infusion, ConceptSet, InfusionGeneration, InfusionOptions};
pub use job::Job;
pub use pipeline::{GenerateOptions, Generation, LoadOptions, StableDiffusion};
