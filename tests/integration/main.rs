//! One integration-test binary, one module per feature.

/// As the binary: weights stay in their mapped files, so every test runs over them.
#[global_allocator]
static ALLOC: infusion_repl::util::MappedAlloc = infusion_repl::util::MappedAlloc;

mod common;

mod attention;
mod baselines;
mod cli;
mod compare;
mod concept;
mod curves;
mod custom_diffusion;
mod dtype;
mod evaluation;
mod first_hour;
mod fisher;
mod flows;
mod fused;
mod infusion;
mod layering;
mod limits;
mod loading;
mod masks;
mod metrics;
mod model_files;
mod other_configs;
mod perfusion;
mod recipes;
mod repl;
mod robustness;

mod samplers;
mod scheduler;
mod script_api;
mod script_errors;
mod sweep;
mod text_encoder;
mod tokenizer;
mod toy;
mod train;
mod txt2img;
mod unet;
mod vae;
