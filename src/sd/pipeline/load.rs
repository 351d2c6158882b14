//! Load: a model from a diffusers folder, a Hugging Face cache repo id or a single checkpoint
//! file of the original layout, whatever layout each component's weights came in; a model of
//! given configs with random weights; further UNets of a loaded model's configuration.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::StableDiffusion;
use crate::error::{Error, Result};
use crate::sd::config::{SchedulerConfig, TextEncoderConfig, UNetConfig, VaeConfig};
use crate::sd::fused::Kernels;
use crate::sd::hub::{resolve_model, ModelFiles};
use crate::sd::scheduler::NoiseSchedule;
use crate::sd::single_file;
use crate::sd::text_encoder::TextEncoder;
use crate::sd::tokenizer::ClipTokenizer;
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
    /// Single-file checkpoints and random weights, which carry no tokenizer: the folder of the
    /// CLIP vocabulary (`vocab.json`, `merges.txt`) SD1.x uses. The command line and scripts
    /// give the bundled one; without it such a model is refused.
    pub vocabulary: Option<PathBuf>,
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
            vocabulary: None,
            kernels: Kernels::default(),
        }
    }
}

impl LoadOptions {
    /// The tokenizer of a model `what` names, which carries none (a single file, random
    /// weights): the CLIP vocabulary of [`LoadOptions::vocabulary`].
    fn tokenizer(&self, what: &str, text: &TextEncoderConfig) -> Result<ClipTokenizer> {
        let vocabulary = self.vocabulary.as_ref().ok_or_else(|| {
            Error::arg(
                "vocabulary",
                format!(
                    "{what} carries no tokenizer: give the folder of SD1.x's CLIP vocabulary \
                     (vocab.json, merges.txt) in LoadOptions::vocabulary"
                ),
            )
        })?;
        ClipTokenizer::from_dir(vocabulary, text.max_position_embeddings)
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
    /// configs of `opts.config` (SD1.5's by default) and the CLIP vocabulary of
    /// `opts.vocabulary`.
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
        let tokenizer = opts.tokenizer(
            &format!("{}: a single-file checkpoint", path.display()),
            &configs.text,
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
    /// tokenizer comes from `opts.vocabulary`.
    pub fn random(configs: &ModelConfigs, opts: &LoadOptions, seed: u64) -> Result<Self> {
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
            tokenizer: opts.tokenizer("a model with random weights", &configs.text)?,
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
