//! The Stable Diffusion 1.x model, as candle-transformers keeps `models/stable_diffusion/`:
//! configs, weights and where they come from, tokenizer, CLIP text encoder, UNet with its
//! attention hook, VAE, scheduler, the text-to-image pipeline and the fused kernels.
//!
//! Nothing here knows of any customization method: batch rows carry opaque tags that callers
//! give meaning, and attention hooks are the one seam through which a method changes the model.

pub mod attention;
pub mod config;
pub mod cpu;
pub mod device;
pub mod fused;
pub mod hook;
pub mod hub;
pub(crate) mod nn;
pub mod pipeline;
pub mod safetensors_check;
pub mod sampler;
pub mod scheduler;
pub mod single_file;
pub mod text_encoder;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod weights;
