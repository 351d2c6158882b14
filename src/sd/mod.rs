//! The Stable Diffusion 1.x model, as candle-transformers keeps `models/stable_diffusion/`:
//! configs, weights and where they come from, tokenizer, CLIP text encoder, UNet with its
//! attention hook, VAE, scheduler, the text-to-image pipeline and the fused kernels.
//!
//! Nothing here knows of any customization method: batch rows carry opaque tags that callers
//! give meaning, and attention hooks are the one seam through which a method changes the model.

pub(crate) mod attention;
pub(crate) mod config;
pub(crate) mod cpu;
pub(crate) mod device;
pub(crate) mod fused;
pub(crate) mod hook;
pub(crate) mod hub;
pub(crate) mod nn;
pub(crate) mod pipeline;
pub(crate) mod safetensors_check;
pub(crate) mod sampler;
pub(crate) mod scheduler;
pub(crate) mod single_file;
pub(crate) mod text_encoder;
pub(crate) mod tokenizer;
pub(crate) mod unet;
pub(crate) mod vae;
pub(crate) mod weights;

// What the tests, the binary and a library user reach (the files are the crate's own).
pub use config::{SchedulerConfig, TextEncoderConfig, TimestepSpacing, UNetConfig, VaeConfig};
pub use device::parse_device;
pub use fused::attention::fused_attention;
pub use fused::{fused_calls_on_this_thread, FusedCalls, Kernels};
pub use hub::{snapshot_in_cache, ModelFiles};
pub use pipeline::{Denoise, ModelConfigs, StepReport, Trajectory};
pub use sampler::{Plan, SamplerKind, SamplerOptions};
pub use scheduler::NoiseSchedule;
pub use single_file::{ldm_unet_key, ldm_vae_key, TEXT, UNET, VAE};
pub use text_encoder::TextEncoder;
pub use tokenizer::ClipTokenizer;
pub use unet::UNet;
pub use vae::Vae;
pub use weights::{load_safetensors, tensors_asked, WeightFiles};
