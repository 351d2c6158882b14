//! DINO ViT-S/16 (transformers' `ViTModel`, facebook/dino-vits16) for DINO-I: the embedding is
//! the CLS token of the last hidden state after the final layer norm.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{conv2d, linear, Conv2d, Conv2dConfig, LayerNorm, Linear, VarBuilder};
use image::RgbImage;
use serde::Deserialize;

use super::clip::weight_file;
use super::preprocess::ImageProcessor;
use crate::error::{Error, Result};
use crate::sd::config::read_json;
use crate::sd::nn::{layer_norm, norm, softmax_last_dim};
use crate::sd::weights::WeightFiles;

fn d_hidden() -> usize {
    384
}
fn d_layers() -> usize {
    12
}
fn d_heads() -> usize {
    6
}
fn d_inter() -> usize {
    1536
}
fn d_image() -> usize {
    224
}
fn d_patch() -> usize {
    16
}
fn d_channels() -> usize {
    3
}
fn d_eps() -> f64 {
    1e-12
}
fn d_true() -> bool {
    true
}
fn d_act() -> String {
    "gelu".into()
}

/// `config.json` of a `ViTModel`.
#[derive(Debug, Clone, Deserialize)]
pub struct VitConfig {
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_inter")]
    pub intermediate_size: usize,
    #[serde(default = "d_image")]
    pub image_size: usize,
    #[serde(default = "d_patch")]
    pub patch_size: usize,
    #[serde(default = "d_channels")]
    pub num_channels: usize,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "d_true")]
    pub qkv_bias: bool,
    #[serde(default = "d_act")]
    pub hidden_act: String,
}

struct VitLayer {
    layernorm_before: LayerNorm,
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    layernorm_after: LayerNorm,
    intermediate: Linear,
    output: Linear,
    heads: usize,
}

impl VitLayer {
    fn new(vb: VarBuilder, c: &VitConfig) -> candle_core::Result<Self> {
        let d = c.hidden_size;
        let att = vb.pp("attention");
        let qkv = |name: &str| {
            if c.qkv_bias {
                linear(d, d, att.pp("attention").pp(name))
            } else {
                candle_nn::linear_no_bias(d, d, att.pp("attention").pp(name))
            }
        };
        Ok(Self {
            layernorm_before: layer_norm(d, c.layer_norm_eps, vb.pp("layernorm_before"))?,
            query: qkv("query")?,
            key: qkv("key")?,
            value: qkv("value")?,
            attn_out: linear(d, d, att.pp("output").pp("dense"))?,
            layernorm_after: layer_norm(d, c.layer_norm_eps, vb.pp("layernorm_after"))?,
            intermediate: linear(d, c.intermediate_size, vb.pp("intermediate").pp("dense"))?,
            output: linear(c.intermediate_size, d, vb.pp("output").pp("dense"))?,
            heads: c.num_attention_heads,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let (b, n, d) = xs.dims3()?;
        let hd = d / self.heads;
        let h = norm(&self.layernorm_before, xs)?;
        let split = |t: Tensor| {
            t.reshape((b, n, self.heads, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.query.forward(&h)?)?;
        let k = split(self.key.forward(&h)?)?;
        let v = split(self.value.forward(&h)?)?;
        let scores = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?;
        let probs = softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(v.dtype())?;
        let ctx = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, n, d))?;
        let xs = (xs + self.attn_out.forward(&ctx)?)?;
        let h = self
            .intermediate
            .forward(&norm(&self.layernorm_after, &xs)?)?
            .gelu_erf()?;
        xs + self.output.forward(&h)?
    }
}

/// A DINO ViT with its image processor.
pub struct Dino {
    cls_token: Tensor,
    position_embeddings: Tensor,
    patch_embeddings: Conv2d,
    layers: Vec<VitLayer>,
    layernorm: LayerNorm,
    pub processor: ImageProcessor,
    device: Device,
    path: PathBuf,
}

impl Dino {
    /// Loads a ViT checkpoint folder (a bare `ViTModel` as facebook/dino-vits16 ships it, or
    /// with a `vit.` prefix; `pooler.*` is ignored).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let path = dir.join("config.json");
        let cfg: VitConfig = read_json(&path)?;
        if cfg.hidden_act != "gelu" {
            return Err(Error::config(
                &path,
                format!("hidden_act `{}` is not supported", cfg.hidden_act),
            ));
        }
        let processor = ImageProcessor::from_file(&dir.join("preprocessor_config.json"), false)?;
        let files = WeightFiles::open("DINO", &[weight_file(dir)?])?;
        let prefixed = files.shapes().any(|(k, _)| k.starts_with("vit."));
        let c = &cfg;
        let (cls_token, position_embeddings, patch_embeddings, layers, layernorm) =
            files.build(DType::F32, device, |vb| {
                let vb = if prefixed { vb.pp("vit") } else { vb };
                let d = c.hidden_size;
                let grid = c.image_size / c.patch_size;
                let emb = vb.pp("embeddings");
                Ok((
                    emb.get((1, 1, d), "cls_token")?,
                    emb.get((1, grid * grid + 1, d), "position_embeddings")?,
                    conv2d(
                        c.num_channels,
                        d,
                        c.patch_size,
                        Conv2dConfig {
                            stride: c.patch_size,
                            ..Default::default()
                        },
                        emb.pp("patch_embeddings").pp("projection"),
                    )?,
                    (0..c.num_hidden_layers)
                        .map(|i| VitLayer::new(vb.pp("encoder").pp("layer").pp(i), c))
                        .collect::<candle_core::Result<Vec<_>>>()?,
                    layer_norm(d, c.layer_norm_eps, vb.pp("layernorm"))?,
                ))
            })?;
        Ok(Self {
            cls_token,
            position_embeddings,
            patch_embeddings,
            layers,
            layernorm,
            processor,
            device: device.clone(),
            path: dir.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn pixel_values(&self, images: &[RgbImage]) -> Result<Tensor> {
        self.processor.batch(images, &self.device)
    }

    /// The last hidden state `(n, 1 + patches, D)` after the final layer norm.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let b = pixels.dim(0)?;
        let patches = self
            .patch_embeddings
            .forward(pixels)?
            .flatten_from(2)?
            .transpose(1, 2)?
            .contiguous()?;
        let d = patches.dim(2)?;
        if patches.dim(1)? + 1 != self.position_embeddings.dim(1)? {
            return Err(Error::arg(
                "images",
                format!(
                    "{} patches, the model has positions for {} (image size differs from the config's)",
                    patches.dim(1)?,
                    self.position_embeddings.dim(1)? - 1
                ),
            ));
        }
        let cls = self.cls_token.broadcast_as((b, 1, d))?.contiguous()?;
        let mut xs = Tensor::cat(&[&cls, &patches], 1)?.broadcast_add(&self.position_embeddings)?;
        for l in &self.layers {
            xs = l.forward(&xs)?;
        }
        Ok(norm(&self.layernorm, &xs)?)
    }

    /// CLS embeddings `(n, D)` (not normalised).
    pub fn embeds(&self, images: &[RgbImage]) -> Result<Tensor> {
        if images.is_empty() {
            return Err(Error::arg("images", "no images"));
        }
        Ok(self
            .forward(&self.pixel_values(images)?)?
            .narrow(1, 0, 1)?
            .squeeze(1)?)
    }
}
