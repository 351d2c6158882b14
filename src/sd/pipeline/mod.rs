//! The Stable Diffusion 1.x text-to-image pipeline (tokenizer, text encoder, UNet, VAE and a
//! sampler with classifier-free guidance), in the phases diffusers' pipelines name, one file
//! each after loading:
//!
//! - [`load`]: a diffusers folder, a Hugging Face cache repo id or a single checkpoint file;
//! - [`check`]: a generation's settings against the model and the machine, before any work;
//! - [`prompt`]: prompts to text states;
//! - [`latents`]: the initial noise, and each sampler call's noise for the samplers that add it;
//! - [`denoise`]: the sampler's loop over any number of trajectories from the same initial
//!   noise, batched in one UNet call per step (`[uncond, cond]` per trajectory), with an
//!   optional attention hook: plain generation runs one trajectory, Infusion runs F and C side
//!   by side;
//! - [`decode`]: latents to images through the VAE.
//!
//! [`StableDiffusion::generate`] is the five phases after loading, for plain SD.

mod check;
mod decode;
mod denoise;
mod latents;
mod load;
mod prompt;

pub use denoise::{Denoise, StepReport, Trajectory};
pub use latents::load_noise;
pub use load::{LoadOptions, ModelConfigs};

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::job::Job;
use crate::sd::fused::Kernels;
use crate::sd::hook::Branch;
use crate::sd::hub::ModelFiles;
use crate::sd::sampler::SamplerOptions;
use crate::sd::scheduler::NoiseSchedule;
use crate::sd::text_encoder::TextEncoder;
use crate::sd::tokenizer::{ClipTokenizer, Tokens};
use crate::sd::unet::UNet;
use crate::sd::vae::Vae;
use crate::sd::weights::WeightFiles;

/// Settings of one text-to-image generation. Defaults follow the paper: DDIM, 50 steps,
/// guidance 8, the model's native size.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub negative_prompt: String,
    pub seed: u64,
    pub steps: usize,
    pub guidance: f64,
    pub sampler: SamplerOptions,
    /// Image size in pixels; `None`: the model's native size.
    pub width: Option<usize>,
    pub height: Option<usize>,
    /// Initial latents `(1, C, h, w)` instead of seeded noise (to reproduce another tool's run).
    pub noise: Option<Tensor>,
    /// Samplers that add noise (ancestral, SDE): each UNet call's noise `(calls, C, h, w)` instead of seeded noise.
    pub step_noise: Option<Tensor>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            negative_prompt: String::new(),
            seed: 0,
            steps: 50,
            guidance: 8.0,
            sampler: SamplerOptions::default(),
            width: None,
            height: None,
            noise: None,
            step_noise: None,
        }
    }
}

/// The result of a text-to-image generation.
#[derive(Debug, Clone)]
pub struct Generation {
    pub prompt: String,
    pub options: GenerateOptions,
    pub tokens: Tokens,
    /// The UNet's timestep at each call of the sampler.
    pub timesteps: Vec<f64>,
    /// Final latents `(1, C, h, w)`, as the UNet sees them (scaled), f32.
    pub latents: Tensor,
    /// Decoded image `(1, 3, H, W)`, values in [0, 1], f32.
    pub image: Tensor,
}

/// A loaded SD1.x model.
pub struct StableDiffusion {
    pub tokenizer: ClipTokenizer,
    pub text_encoder: TextEncoder,
    pub unet: UNet,
    pub vae: Vae,
    pub scheduler: NoiseSchedule,
    files: Option<ModelFiles>,
    /// Every weight file it was built from.
    weight_files: Vec<PathBuf>,
    /// The UNet's files as it was built from them (to build trainable copies); none for random
    /// weights.
    unet_files: Option<std::sync::Arc<WeightFiles>>,
    /// What it is called in records: its folder's or file's name.
    name: String,
    /// What loading chose on the user's behalf (EMA weights, another VAE), to say.
    notes: Vec<String>,
    unet_fingerprint: String,
    /// Fingerprint of the text encoder's weights (what its statistics are cached by).
    text_fingerprint: String,
    device: Device,
    dtype: DType,
    vae_dtype: DType,
    /// What its layers run, as loaded (also what the UNets built from it later run).
    kernels: Kernels,
}

impl StableDiffusion {
    /// Fingerprint of the UNet weights (`base_model` of the concepts trained on this model).
    pub fn unet_fingerprint(&self) -> &str {
        &self.unet_fingerprint
    }

    /// Fingerprint of the text encoder's weights (what statistics of its outputs, Perfusion's
    /// covariance, are cached by).
    pub fn text_fingerprint(&self) -> &str {
        &self.text_fingerprint
    }

    pub fn files(&self) -> Option<&ModelFiles> {
        self.files.as_ref()
    }

    /// Every weight file the model was built from (none for random weights).
    pub fn weight_files(&self) -> &[PathBuf] {
        &self.weight_files
    }

    /// The model's name for records: its folder's or file's name (`random` for benchmark
    /// weights).
    pub fn name(&self) -> String {
        self.name.clone()
    }

    /// What loading chose on the user's behalf (EMA weights, another VAE), to say.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The kernels its layers run ([`LoadOptions::kernels`]).
    pub fn kernels(&self) -> Kernels {
        self.kernels
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The VAE's dtype (f32 when its config forces the upcast).
    pub fn vae_dtype(&self) -> DType {
        self.vae_dtype
    }

    /// Pixels per latent cell.
    pub fn vae_scale_factor(&self) -> usize {
        self.vae.config().scale_factor()
    }

    /// The model's native image size (UNet sample size times the VAE scale factor).
    pub fn default_size(&self) -> usize {
        let s = self.unet.config().sample_size.unwrap_or(64);
        s * self.vae_scale_factor()
    }

    /// Text-to-image with plain SD.
    pub fn generate(&self, prompt: &str, opts: &GenerateOptions, job: &Job) -> Result<Generation> {
        self.check_generate(opts, 2)?;
        let tokens = self.tokenize(prompt)?;
        let negative = self.tokenize(&opts.negative_prompt)?;
        let states = self.text_states(&[&negative, &tokens])?;
        let init = self.initial_latents(opts)?;
        let traj = Trajectory {
            branch: Branch::MAIN,
            sample: 0,
            uncond: states.get(0)?.unsqueeze(0)?,
            cond: states.get(1)?.unsqueeze(0)?,
        };
        let latents = self
            .denoise(&Denoise::new(&init, &[traj], opts), job, &mut |_| Ok(()))?
            .remove(0);
        let image = self.decode_to_unit(&latents)?;
        Ok(Generation {
            prompt: prompt.to_string(),
            options: opts.clone(),
            tokens,
            timesteps: self.plan(opts)?.timesteps().to_vec(),
            latents,
            image,
        })
    }
}

/// `Err(NotFinite(what()))` unless every value of `t` is finite.
fn finite(t: &Tensor, what: impl FnOnce() -> String) -> Result<()> {
    if crate::util::tensors::all_finite(t)? {
        Ok(())
    } else {
        Err(Error::NotFinite(what()))
    }
}
