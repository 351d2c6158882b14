//! One integration-test binary, one module per feature.

mod common;

mod attention;
mod cli;
mod concept;
mod curves;
mod dtype;
mod evaluation;
mod first_hour;
mod fisher;
mod fused;
mod infusion;
mod loading;
mod metrics;
mod model_files;
mod other_configs;
mod recipes;
mod repl;
mod robustness;

mod samplers;
mod scheduler;
mod script_api;
mod sweep;
mod text_encoder;
mod tokenizer;
mod train;
mod txt2img;
mod unet;
mod vae;
