//! CLIP (transformers' `CLIPModel`) for CLIP-T and CLIP-I: both towers and their projections,
//! loaded from the Hugging Face layout (`config.json`, `model.safetensors`,
//! `preprocessor_config.json`; openai/clip-vit-base-patch32 and clip-vit-large-patch14).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{
    conv2d_no_bias, embedding, linear_no_bias, Conv2dConfig, Embedding, LayerNorm, Linear,
    VarBuilder,
};
use image::RgbImage;
use serde::Deserialize;

use super::preprocess::ImageProcessor;
use crate::error::{Error, Result};
use crate::sd::config::{read_json, TextActivation, TextEncoderConfig};
use crate::sd::nn::{layer_norm, norm};
use crate::sd::text_encoder::{ClipLayer, LayerDims, TextEncoder};
use crate::sd::tokenizer::ClipTokenizer;
use crate::sd::weights::WeightFiles;

fn d_text_hidden() -> usize {
    512
}
fn d_text_inter() -> usize {
    2048
}
fn d_layers() -> usize {
    12
}
fn d_text_heads() -> usize {
    8
}
fn d_positions() -> usize {
    77
}
fn d_vocab() -> usize {
    49408
}
fn d_act() -> TextActivation {
    TextActivation::QuickGelu
}
fn d_eps() -> f64 {
    1e-5
}
fn d_vis_hidden() -> usize {
    768
}
fn d_vis_inter() -> usize {
    3072
}
fn d_vis_heads() -> usize {
    12
}
fn d_image() -> usize {
    224
}
fn d_patch() -> usize {
    32
}
fn d_channels() -> usize {
    3
}
fn d_proj() -> usize {
    512
}
fn d_eos() -> u32 {
    2
}

/// `text_config` with transformers' `CLIPTextConfig` defaults for keys a file leaves out.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    #[serde(default = "d_text_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_text_inter")]
    pub intermediate_size: usize,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_text_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "d_act")]
    pub hidden_act: TextActivation,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    /// 2 (the original checkpoints' legacy value) means: pool at `argmax(ids)`.
    #[serde(default = "d_eos")]
    pub eos_token_id: u32,
}

/// `vision_config` with transformers' `CLIPVisionConfig` defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipVisionConfig {
    #[serde(default = "d_vis_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_vis_inter")]
    pub intermediate_size: usize,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_vis_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_image")]
    pub image_size: usize,
    #[serde(default = "d_patch")]
    pub patch_size: usize,
    #[serde(default = "d_channels")]
    pub num_channels: usize,
    #[serde(default = "d_act")]
    pub hidden_act: TextActivation,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
}

/// `config.json` of a `CLIPModel`.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipConfig {
    pub text_config: ClipTextConfig,
    pub vision_config: ClipVisionConfig,
    #[serde(default = "d_proj")]
    pub projection_dim: usize,
}

impl ClipTextConfig {
    fn encoder(&self) -> TextEncoderConfig {
        TextEncoderConfig {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            max_position_embeddings: self.max_position_embeddings,
            hidden_act: self.hidden_act,
            layer_norm_eps: self.layer_norm_eps,
        }
    }
}

/// CLIP's vision tower.
struct VisionTower {
    class_embedding: Tensor,
    patch_embedding: candle_nn::Conv2d,
    position_embedding: Embedding,
    pre_layrnorm: LayerNorm,
    layers: Vec<ClipLayer>,
    post_layernorm: LayerNorm,
    num_positions: usize,
}

impl VisionTower {
    fn new(vb: VarBuilder, c: &ClipVisionConfig) -> candle_core::Result<Self> {
        let d = c.hidden_size;
        let dims = LayerDims {
            hidden_size: d,
            intermediate_size: c.intermediate_size,
            num_attention_heads: c.num_attention_heads,
            hidden_act: c.hidden_act,
            layer_norm_eps: c.layer_norm_eps,
        };
        let grid = c.image_size / c.patch_size;
        let num_positions = grid * grid + 1;
        let emb = vb.pp("embeddings");
        Ok(Self {
            class_embedding: emb.get(d, "class_embedding")?,
            patch_embedding: conv2d_no_bias(
                c.num_channels,
                d,
                c.patch_size,
                Conv2dConfig {
                    stride: c.patch_size,
                    ..Default::default()
                },
                emb.pp("patch_embedding"),
            )?,
            position_embedding: embedding(num_positions, d, emb.pp("position_embedding"))?,
            pre_layrnorm: layer_norm(d, c.layer_norm_eps, vb.pp("pre_layrnorm"))?,
            layers: (0..c.num_hidden_layers)
                .map(|i| ClipLayer::new(vb.pp("encoder").pp("layers").pp(i), &dims))
                .collect::<candle_core::Result<_>>()?,
            post_layernorm: layer_norm(d, c.layer_norm_eps, vb.pp("post_layernorm"))?,
            num_positions,
        })
    }

    /// `(b, 3, H, W)` -> (last hidden state before post_layernorm, pooled = post_layernorm(CLS)).
    fn forward(&self, pixels: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let b = pixels.dim(0)?;
        let patches = self
            .patch_embedding
            .forward(pixels)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let d = patches.dim(2)?;
        if patches.dim(1)? + 1 != self.num_positions {
            candle_core::bail!(
                "{} patches, the model has positions for {}",
                patches.dim(1)?,
                self.num_positions - 1
            );
        }
        let cls = self
            .class_embedding
            .reshape((1, 1, d))?
            .broadcast_as((b, 1, d))?;
        let positions = Tensor::arange(0u32, self.num_positions as u32, pixels.device())?;
        let mut xs = Tensor::cat(&[&cls.contiguous()?, &patches.contiguous()?], 1)?
            .broadcast_add(&self.position_embedding.forward(&positions)?)?;
        xs = norm(&self.pre_layrnorm, &xs)?;
        for l in &self.layers {
            xs = l.forward(&xs, None, None)?;
        }
        let pooled = norm(&self.post_layernorm, &xs.narrow(1, 0, 1)?.squeeze(1)?)?;
        Ok((xs, pooled))
    }
}

/// A CLIP model with its tokenizer and image processor.
pub struct Clip {
    text: TextEncoder,
    vision: VisionTower,
    text_projection: Linear,
    visual_projection: Linear,
    pub logit_scale: Tensor,
    pub tokenizer: ClipTokenizer,
    pub processor: ImageProcessor,
    eos_token_id: u32,
    device: Device,
    path: PathBuf,
}

impl Clip {
    /// Loads a CLIP checkpoint folder. The tokenizer is the folder's `vocab.json` +
    /// `merges.txt`, or `fallback_tokenizer` (the same BPE, e.g. an SD model's `tokenizer/`).
    pub fn load(dir: &Path, fallback_tokenizer: &Path, device: &Device) -> Result<Self> {
        let cfg: ClipConfig = read_json(&dir.join("config.json"))?;
        let processor = ImageProcessor::from_file(&dir.join("preprocessor_config.json"), true)?;
        let tok_dir = if dir.join("vocab.json").is_file() {
            dir
        } else {
            fallback_tokenizer
        };
        let tokenizer = ClipTokenizer::from_dir(tok_dir, cfg.text_config.max_position_embeddings)?;
        let weights = weight_file(dir)?;
        let files = WeightFiles::open("CLIP", &[weights])?;
        let (text, vision, text_projection, visual_projection, logit_scale) =
            files.build(DType::F32, device, |vb| {
                Ok((
                    TextEncoder::new(vb.clone(), &cfg.text_config.encoder())?,
                    VisionTower::new(vb.pp("vision_model"), &cfg.vision_config)?,
                    linear_no_bias(
                        cfg.text_config.hidden_size,
                        cfg.projection_dim,
                        vb.pp("text_projection"),
                    )?,
                    linear_no_bias(
                        cfg.vision_config.hidden_size,
                        cfg.projection_dim,
                        vb.pp("visual_projection"),
                    )?,
                    vb.get((), "logit_scale")?,
                ))
            })?;
        Ok(Self {
            text,
            vision,
            text_projection,
            visual_projection,
            logit_scale,
            tokenizer,
            processor,
            eos_token_id: cfg.text_config.eos_token_id,
            device: device.clone(),
            path: dir.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Pixel values `(n, 3, H, W)` of images, preprocessed as the checkpoint says.
    pub fn pixel_values(&self, images: &[RgbImage]) -> Result<Tensor> {
        self.processor.batch(images, &self.device)
    }

    /// Vision tower on pixel values: (last hidden state, pooled, projected embeddings).
    pub fn vision_forward(&self, pixels: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (last, pooled) = self.vision.forward(pixels)?;
        let embeds = self.visual_projection.forward(&pooled)?;
        Ok((last, pooled, embeds))
    }

    /// Image embeddings `(n, P)` (not normalised).
    pub fn image_embeds(&self, images: &[RgbImage]) -> Result<Tensor> {
        if images.is_empty() {
            return Err(Error::arg("images", "no images"));
        }
        Ok(self.vision_forward(&self.pixel_values(images)?)?.2)
    }

    /// Text tower on token ids `(n, 77)`: (last hidden state, pooled at the end token,
    /// projected embeddings).
    pub fn text_forward(&self, ids: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let last = self.text.forward(ids)?;
        let eos = self.eos_positions(ids)?;
        let rows = eos
            .iter()
            .enumerate()
            .map(|(i, &p)| last.get(i)?.get(p))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let pooled = Tensor::stack(&rows, 0)?;
        let embeds = self.text_projection.forward(&pooled)?;
        Ok((last, pooled, embeds))
    }

    /// Where each row is pooled: `argmax(ids)` for the legacy `eos_token_id` 2 (the first end
    /// token, whose id is the largest), else the first `eos_token_id`.
    fn eos_positions(&self, ids: &Tensor) -> Result<Vec<usize>> {
        let ids: Vec<Vec<u32>> = ids.to_dtype(DType::U32)?.to_vec2()?;
        Ok(ids
            .iter()
            .map(|row| {
                if self.eos_token_id == 2 {
                    row.iter()
                        .enumerate()
                        .fold(
                            (0, 0),
                            |(bi, bv), (i, &v)| if v > bv { (i, v) } else { (bi, bv) },
                        )
                        .0
                } else {
                    row.iter()
                        .position(|&v| v == self.eos_token_id)
                        .unwrap_or(row.len() - 1)
                }
            })
            .collect())
    }

    /// Token ids `(n, 77)` of prompts.
    pub fn token_ids(&self, prompts: &[&str]) -> Result<Tensor> {
        let len = self.tokenizer.max_len();
        let ids = prompts
            .iter()
            .map(|p| Ok(self.tokenizer.encode(p)?.ids))
            .collect::<Result<Vec<_>>>()?
            .concat();
        Ok(Tensor::from_vec(ids, (prompts.len(), len), &self.device)?)
    }

    /// Text embeddings `(n, P)` of prompts (not normalised).
    pub fn text_embeds(&self, prompts: &[&str]) -> Result<Tensor> {
        if prompts.is_empty() {
            return Err(Error::arg("prompts", "no prompts"));
        }
        Ok(self.text_forward(&self.token_ids(prompts)?)?.2)
    }
}

/// The weights file of a transformers checkpoint folder.
pub(crate) fn weight_file(dir: &Path) -> Result<PathBuf> {
    let p = dir.join("model.safetensors");
    if p.is_file() {
        Ok(p)
    } else if dir.join("pytorch_model.bin").is_file() {
        Err(Error::Unsupported(format!(
            "{} holds only PyTorch weights (pytorch_model.bin): model.safetensors is needed",
            dir.display()
        )))
    } else {
        Err(Error::ModelNotFound(format!(
            "no model.safetensors in {}",
            dir.display()
        )))
    }
}

/// Rows scaled to unit length (no epsilon, as the reference).
pub fn normalize_rows(x: &Tensor) -> Result<Tensor> {
    let n = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
    Ok(x.broadcast_div(&n)?)
}

/// Cosine similarities `(na, nb)` between the rows of `a` and of `b`.
pub fn cosine_matrix(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(normalize_rows(a)?.matmul(&normalize_rows(b)?.t()?)?)
}
