//! The Stable Diffusion 1.x text-to-image pipeline (tokenizer, text encoder, UNet, VAE and a
//! sampler with classifier-free guidance), in the phases diffusers' pipelines name, one file
//! each after loading:
//!
//! - load (here): a diffusers folder, a Hugging Face cache repo id or a single checkpoint file;
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
mod prompt;

pub use denoise::{Denoise, StepReport, Trajectory};
pub use latents::load_noise;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::job::Job;
use crate::sd::config::{SchedulerConfig, TextEncoderConfig, UNetConfig, VaeConfig};
use crate::sd::fused::Kernels;
use crate::sd::hook::Branch;
use crate::sd::hub::{resolve_model, ModelFiles};
use crate::sd::sampler::SamplerOptions;
use crate::sd::scheduler::NoiseSchedule;
use crate::sd::single_file;
use crate::sd::text_encoder::TextEncoder;
use crate::sd::tokenizer::{ClipTokenizer, Tokens};
use crate::sd::unet::UNet;
use crate::sd::vae::Vae;
use crate::sd::weights::WeightFiles;

/// The configs of every component.
#[derive(Debug, Clone)]
pub struct ModelConfigs {
    pub text: TextEncoderConfig,
    pub unet: UNetConfig,
    pub vae: VaeConfig,
    pub scheduler: SchedulerConfig,
}

impl ModelConfigs {
    /// SD1.5's published configs.
    pub fn sd15() -> Self {
        Self {
            text: TextEncoderConfig::sd15(),
            unet: UNetConfig::sd15(),
            vae: VaeConfig::sd15(),
            scheduler: SchedulerConfig::sd15(),
        }
    }
}

/// Where and in which precision to run, and what to take from elsewhere.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    /// Working dtype of the text encoder and UNet. The VAE runs in f32 when its config says
    /// `force_upcast` (SD1.5's does: its decoder overflows in f16).
    pub dtype: DType,
    /// A diffusers folder whose configs describe a single-file checkpoint (default: SD1.5's).
    pub config: Option<PathBuf>,
    /// Another VAE: a diffusers VAE folder, or a safetensors file (diffusers or original layout).
    pub vae: Option<PathBuf>,
    /// Single-file checkpoints holding an EMA copy of the UNet: `Some(true)` takes it,
    /// `Some(false)` the plain weights, `None` (the default) the EMA copy when there is one.
    pub ema: Option<bool>,
    /// The implementations the UNet's attention layers and every group norm run (naive by
    /// default); the model keeps them for its lifetime, whatever other models use.
    pub kernels: Kernels,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
            config: None,
            vae: None,
            ema: None,
            kernels: Kernels::default(),
        }
    }
}

impl ModelConfigs {
    /// The configs of a diffusers folder (`unet/config.json`, ...; SD1.5's scheduler where it
    /// has none).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let scheduler = dir.join("scheduler").join("scheduler_config.json");
        Ok(Self {
            text: TextEncoderConfig::from_file(&dir.join("text_encoder").join("config.json"))?,
            unet: UNetConfig::from_file(&dir.join("unet").join("config.json"))?,
            vae: VaeConfig::from_file(&dir.join("vae").join("config.json"))?,
            scheduler: if scheduler.is_file() {
                SchedulerConfig::from_file(&scheduler)?
            } else {
                SchedulerConfig::sd15()
            },
        })
    }
}

/// What a model is built from: its configs, tokenizer and the weight files of each component,
/// whatever layout they came in.
struct Parts {
    name: String,
    configs: ModelConfigs,
    tokenizer: ClipTokenizer,
    text: WeightFiles,
    unet: WeightFiles,
    vae: WeightFiles,
    files: Option<ModelFiles>,
}

/// A replacement VAE: a diffusers folder (config + weights), a diffusers file, or a file of the
/// original layout (`encoder.down.0...`, bare or under `first_stage_model.` or `vae.`). A file
/// takes the model's VAE config.
fn vae_parts(path: &Path, cfg: &VaeConfig, prefer_fp16: bool) -> Result<(VaeConfig, WeightFiles)> {
    if path.is_dir() {
        let cfg = VaeConfig::from_file(&path.join("config.json"))?;
        let weights = crate::sd::hub::find_weights(path, "diffusion_pytorch_model", prefer_fp16)?;
        return Ok((cfg, WeightFiles::open("VAE", &weights)?));
    }
    let path = single_file::check_safetensors(path)?;
    let files = WeightFiles::open("VAE", std::slice::from_ref(&path))?;
    let ldm_prefix = [single_file::VAE, "vae.", ""]
        .into_iter()
        .find(|p| files.has_prefix(&format!("{p}encoder.down.")));
    let files = match ldm_prefix {
        Some(prefix) => single_file::vae_files(&path, cfg, prefix)?,
        None => files,
    };
    Ok((cfg.clone(), files))
}

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
    /// Loads a model from a folder, a Hugging Face cache repo id, or a single checkpoint file.
    pub fn load(spec: &str, opts: &LoadOptions) -> Result<Self> {
        let path = Path::new(spec);
        if single_file::is_single_file(path) {
            return Self::load_single_file(path, opts);
        }
        let root = resolve_model(spec)?;
        Self::load_dir(&root, opts)
    }

    /// Loads an SD1.x checkpoint of the original layout from one safetensors file, with the
    /// configs of `opts.config` (SD1.5's by default) and the bundled CLIP vocabulary.
    pub fn load_single_file(path: &Path, opts: &LoadOptions) -> Result<Self> {
        let path = single_file::check_safetensors(path)?;
        single_file::check_kind(
            &path,
            &WeightFiles::open("checkpoint", std::slice::from_ref(&path))?,
        )?;
        let configs = match &opts.config {
            Some(dir) => ModelConfigs::from_dir(dir)?,
            None => ModelConfigs::sd15(),
        };
        let tokenizer = ClipTokenizer::from_dir(
            &crate::assets::clip_tokenizer(),
            configs.text.max_position_embeddings,
        )?;
        let (unet, which) = single_file::unet_files(&path, &configs.unet, opts.ema)?;
        let parts = Parts {
            name: path
                .file_stem()
                .map_or_else(String::new, |s| s.to_string_lossy().into_owned()),
            tokenizer,
            text: single_file::text_files(&path)?,
            unet,
            vae: single_file::vae_files(&path, &configs.vae, single_file::VAE)?,
            configs,
            files: None,
        };
        let mut sd = Self::from_parts(parts, opts).map_err(|e| match e {
            Error::Weights {
                component,
                files,
                problems,
                hint: _,
            } if opts.config.is_none() => Error::Weights {
                component,
                files,
                problems,
                hint: Some(
                    "read with SD1.5's configs, which this checkpoint does not fit: give the \
                     diffusers folder of its configs with --config DIR (`config` in scripts)"
                        .into(),
                ),
            },
            e => e,
        })?;
        if which.both {
            sd.notes.push(if which.ema {
                format!(
                    "{} holds EMA and plain UNet weights: using the EMA ones (--no-ema or \
                     `ema: false` for the plain ones)",
                    path.display()
                )
            } else {
                format!(
                    "{} holds EMA and plain UNet weights: using the plain ones",
                    path.display()
                )
            });
        } else if which.ema {
            sd.notes.push(format!(
                "the UNet uses the EMA weights of {}",
                path.display()
            ));
        }
        Ok(sd)
    }

    /// Loads a model from a folder in diffusers layout.
    pub fn load_dir(root: &Path, opts: &LoadOptions) -> Result<Self> {
        if opts.ema.is_some() {
            return Err(Error::arg(
                "ema",
                format!(
                    "{} is a diffusers folder: EMA weights are a choice of single-file checkpoints",
                    root.display()
                ),
            ));
        }
        if let Some(config) = &opts.config {
            return Err(Error::arg(
                "config",
                format!(
                    "{} gives configs for a single-file checkpoint; {} is a diffusers folder \
                     with its own",
                    config.display(),
                    root.display()
                ),
            ));
        }
        let files = ModelFiles::locate(root, opts.dtype == DType::F16)?;
        let configs = ModelConfigs {
            text: TextEncoderConfig::from_file(&files.text_encoder.config)?,
            unet: UNetConfig::from_file(&files.unet.config)?,
            vae: VaeConfig::from_file(&files.vae.config)?,
            scheduler: match &files.scheduler {
                Some(p) => SchedulerConfig::from_file(p)?,
                None => SchedulerConfig::sd15(),
            },
        };
        check_compatible(&files, &configs.text, &configs.unet, &configs.vae)?;
        let parts = Parts {
            name: files
                .root
                .file_name()
                .map_or_else(|| "model".to_string(), |n| n.to_string_lossy().into_owned()),
            tokenizer: ClipTokenizer::from_dir(
                &files.tokenizer,
                configs.text.max_position_embeddings,
            )?,
            text: text_encoder_files(&files.text_encoder.weights)?,
            unet: WeightFiles::open("UNet", &files.unet.weights)?,
            vae: WeightFiles::open("VAE", &files.vae.weights)?,
            configs,
            files: Some(files),
        };
        Self::from_parts(parts, opts)
    }

    /// Builds the model of `parts` (with `opts.vae` instead of its VAE when given).
    fn from_parts(mut parts: Parts, opts: &LoadOptions) -> Result<Self> {
        if opts.device.is_cpu() && opts.dtype == DType::BF16 {
            return Err(Error::Unsupported(
                "bf16 on the CPU (candle's CPU matmul has no bf16): use f32 or f16 there".into(),
            ));
        }
        let mut notes = vec![];
        if let Some(vae) = &opts.vae {
            let (cfg, files) = vae_parts(vae, &parts.configs.vae, opts.dtype == DType::F16)?;
            parts.configs.vae = cfg;
            parts.vae = files;
            notes.push(format!("the VAE comes from {}", vae.display()));
        }
        let c = &parts.configs;
        let dev = &opts.device;
        let vae_dtype = if c.vae.force_upcast {
            DType::F32
        } else {
            opts.dtype
        };
        let text_encoder = parts
            .text
            .build(opts.dtype, dev, |vb| TextEncoder::new(vb, &c.text))?;
        let unet = parts
            .unet
            .build(opts.dtype, dev, |vb| UNet::new(vb, &c.unet, opts.kernels))?;
        let unet_fingerprint = parts.unet.fingerprint()?;
        let text_fingerprint = parts.text.fingerprint()?;
        let vae = parts
            .vae
            .build(vae_dtype, dev, |vb| Vae::new(vb, &c.vae, opts.kernels))?;
        let mut weight_files: Vec<PathBuf> = [&parts.text, &parts.unet, &parts.vae]
            .iter()
            .flat_map(|w| w.files().to_vec())
            .collect();
        weight_files.sort();
        weight_files.dedup();
        let unet_files = Some(std::sync::Arc::new(parts.unet));
        Ok(Self {
            unet_files,
            tokenizer: parts.tokenizer,
            text_encoder,
            unet,
            vae,
            scheduler: NoiseSchedule::new(&c.scheduler),
            files: parts.files,
            weight_files,
            name: parts.name,
            notes,
            unet_fingerprint,
            text_fingerprint,
            device: dev.clone(),
            dtype: opts.dtype,
            vae_dtype,
            kernels: opts.kernels,
        })
    }

    /// A model with the given configs and random weights (for benchmarks at real shapes): the
    /// tokenizer comes from `tokenizer_dir`.
    pub fn random(
        configs: &ModelConfigs,
        tokenizer_dir: &Path,
        opts: &LoadOptions,
        seed: u64,
    ) -> Result<Self> {
        let dev = &opts.device;
        let vae_dtype = if configs.vae.force_upcast {
            DType::F32
        } else {
            opts.dtype
        };
        let vb = |dtype, s| crate::sd::weights::random_varbuilder(seed + s, dtype, dev);
        let text_encoder = TextEncoder::new(vb(opts.dtype, 1), &configs.text)?;
        let unet = UNet::new(vb(opts.dtype, 2), &configs.unet, opts.kernels)?;
        let vae = Vae::new(vb(vae_dtype, 3), &configs.vae, opts.kernels)?;
        Ok(Self {
            tokenizer: ClipTokenizer::from_dir(
                tokenizer_dir,
                configs.text.max_position_embeddings,
            )?,
            text_encoder,
            unet,
            vae,
            scheduler: NoiseSchedule::new(&configs.scheduler),
            files: None,
            weight_files: vec![],
            unet_files: None,
            name: "random".into(),
            notes: vec![],
            unet_fingerprint: format!("random:{seed}"),
            text_fingerprint: format!("random:{seed}"),
            device: dev.clone(),
            dtype: opts.dtype,
            vae_dtype,
            kernels: opts.kernels,
        })
    }

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

    /// A trainable copy of the UNet (its weights as `Var`s, by their diffusers names), built
    /// from the files it was loaded from.
    pub fn trainable_unet(&self) -> Result<(UNet, Vec<(String, candle_core::Var)>)> {
        let files = self.unet_files.as_ref().ok_or_else(|| {
            Error::Unsupported("a model with random weights has no UNet files to train".into())
        })?;
        let cfg = self.unet.config().clone();
        files.build_trainable(self.dtype, &self.device, |vb| {
            UNet::new(vb, &cfg, self.kernels)
        })
    }

    /// Another UNet of this model's configuration, from weight files in diffusers' names (a
    /// fine-tuned copy), in the model's dtype and on its device.
    pub fn unet_from_files(&self, files: &[PathBuf]) -> Result<UNet> {
        let cfg = self.unet.config().clone();
        crate::sd::weights::WeightFiles::open("UNet", files)?.build(
            self.dtype,
            &self.device,
            |vb| UNet::new(vb, &cfg, self.kernels),
        )
    }

    /// Another UNet of this model's configuration from tensors by diffusers' names (a trained
    /// copy's plain values), shared, not copied.
    pub fn unet_from_tensors(
        &self,
        tensors: std::collections::HashMap<String, Tensor>,
    ) -> Result<UNet> {
        let vb = candle_nn::VarBuilder::from_tensors(tensors, self.dtype, &self.device);
        Ok(UNet::new(vb, self.unet.config(), self.kernels)?)
    }

    /// The number of parameters of this model's UNet.
    pub fn unet_parameters(&self) -> Result<usize> {
        Ok(crate::sd::weights::tensors_asked(|vb| {
            UNet::new(vb, self.unet.config(), self.kernels).map(|_| ())
        })?
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum())
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

/// A text encoder's weight files. transformers 5 saves `CLIPTextModel` without the
/// `text_model.` prefix older files have: such files are read through a name map.
fn text_encoder_files(paths: &[std::path::PathBuf]) -> Result<WeightFiles> {
    let files = WeightFiles::open("text encoder", paths)?;
    Ok(
        if !files.has_prefix("text_model.") && files.has_prefix("embeddings.") {
            files.with_names(|name| name.strip_prefix("text_model.").unwrap_or(name).to_string())
        } else {
            files
        },
    )
}

/// `Err(NotFinite(what()))` unless every value of `t` is finite.
fn finite(t: &Tensor, what: impl FnOnce() -> String) -> Result<()> {
    if crate::util::tensors::all_finite(t)? {
        Ok(())
    } else {
        Err(Error::NotFinite(what()))
    }
}

/// The components must fit together: text width = the UNet's cross-attention width, VAE latents
/// = UNet input channels.
fn check_compatible(
    files: &ModelFiles,
    te: &TextEncoderConfig,
    unet: &UNetConfig,
    vae: &VaeConfig,
) -> Result<()> {
    for i in 0..unet.n_blocks() {
        let d = unet.cross_attention_dim.get(i);
        if d != te.hidden_size {
            return Err(Error::config(
                &files.unet.config,
                format!(
                    "cross_attention_dim {d} does not match the text encoder's hidden_size {} ({})",
                    te.hidden_size,
                    files.text_encoder.config.display()
                ),
            ));
        }
    }
    if unet.in_channels != vae.latent_channels {
        return Err(Error::config(
            &files.unet.config,
            format!(
                "in_channels {} does not match the VAE's latent_channels {} ({})",
                unet.in_channels,
                vae.latent_channels,
                files.vae.config.display()
            ),
        ));
    }
    Ok(())
}
