//! The VAE (diffusers `AutoencoderKL`): encoder to a diagonal Gaussian over latents, decoder back
//! to pixels. Both attention namings of the mid-block attention are accepted: diffusers'
//! current `to_q/to_k/to_v/to_out.0` and the older `query/key/value/proj_attn`.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{Conv2dConfig, VarBuilder};

use crate::sd::nn::{conv2d, linear, Conv2d, Linear};

use crate::sd::config::VaeConfig;
use crate::sd::fused::group_norm::GroupNorm;
use crate::sd::fused::Kernels;
use crate::sd::nn::{ResnetBlock, ResnetSpec};

const VAE_EPS: f64 = 1e-6;

/// A 3x3 convolution.
fn conv3x3(cin: usize, cout: usize, vb: VarBuilder) -> Result<Conv2d> {
    conv2d(
        cin,
        cout,
        3,
        Conv2dConfig {
            padding: 1,
            ..Default::default()
        },
        vb,
    )
}

fn resnet(
    vb: VarBuilder,
    cin: usize,
    cout: usize,
    groups: usize,
    kernels: Kernels,
) -> Result<ResnetBlock> {
    ResnetBlock::new(
        vb,
        ResnetSpec {
            in_channels: cin,
            out_channels: cout,
            temb_channels: None,
            groups,
            eps: VAE_EPS,
            output_scale_factor: 1.0,
        },
        kernels,
    )
}

/// Single-head self-attention over the pixels of the mid block.
struct VaeAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl VaeAttention {
    fn new(vb: VarBuilder, channels: usize, groups: usize, kernels: Kernels) -> Result<Self> {
        let (q, k, v, o) = if vb.contains_tensor("query.weight") {
            ("query", "key", "value", "proj_attn")
        } else {
            ("to_q", "to_k", "to_v", "to_out.0")
        };
        Ok(Self {
            group_norm: GroupNorm::load(groups, channels, VAE_EPS, kernels, vb.pp("group_norm"))?,
            to_q: linear(channels, channels, vb.pp(q))?,
            to_k: linear(channels, channels, vb.pp(k))?,
            to_v: linear(channels, channels, vb.pp(v))?,
            to_out: linear(channels, channels, vb.pp(o))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let tokens = self
            .group_norm
            .forward(xs, false)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            // candle 0.11.1's Linear gives wrong results on a transposed 3-D input with batch > 1.
            .contiguous()?;
        let q = self.to_q.forward(&tokens)?;
        let k = self.to_k.forward(&tokens)?;
        let v = self.to_v.forward(&tokens)?;
        let scale = 1.0 / (c as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?.to_dtype(DType::F32)?;
        let probs = crate::sd::nn::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
        let out = self.to_out.forward(&probs.matmul(&v)?)?;
        let out = out.transpose(1, 2)?.reshape((b, c, h, w))?;
        out + xs
    }
}

struct MidBlock {
    resnet0: ResnetBlock,
    attention: Option<VaeAttention>,
    resnet1: ResnetBlock,
}

impl MidBlock {
    fn new(vb: VarBuilder, channels: usize, cfg: &VaeConfig, kernels: Kernels) -> Result<Self> {
        let g = cfg.norm_num_groups;
        let attention = vb.pp("attentions").pp(0);
        Ok(Self {
            resnet0: resnet(vb.pp("resnets").pp(0), channels, channels, g, kernels)?,
            attention: if cfg.mid_block_add_attention {
                Some(VaeAttention::new(attention, channels, g, kernels)?)
            } else {
                None
            },
            resnet1: resnet(vb.pp("resnets").pp(1), channels, channels, g, kernels)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = self.resnet0.forward(xs, None)?;
        if let Some(attn) = &self.attention {
            xs = attn.forward(&xs)?;
        }
        self.resnet1.forward(&xs, None)
    }
}

struct CoderBlock {
    resnets: Vec<ResnetBlock>,
    /// Encoder: stride-2 conv after padding right/bottom; decoder: nearest 2x then conv.
    resample: Option<Conv2d>,
}

struct Encoder {
    conv_in: Conv2d,
    blocks: Vec<CoderBlock>,
    mid: MidBlock,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(vb: VarBuilder, cfg: &VaeConfig, kernels: Kernels) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let g = cfg.norm_num_groups;
        let mut blocks = Vec::with_capacity(n);
        for i in 0..n {
            let bvb = vb.pp("down_blocks").pp(i);
            let cin = if i == 0 { ch[0] } else { ch[i - 1] };
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    resnet(
                        bvb.pp("resnets").pp(j),
                        if j == 0 { cin } else { ch[i] },
                        ch[i],
                        g,
                        kernels,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let resample = if i + 1 < n {
                let c = Conv2dConfig {
                    stride: 2,
                    ..Default::default()
                };
                Some(conv2d(
                    ch[i],
                    ch[i],
                    3,
                    c,
                    bvb.pp("downsamplers").pp(0).pp("conv"),
                )?)
            } else {
                None
            };
            blocks.push(CoderBlock { resnets, resample });
        }
        Ok(Self {
            conv_in: conv3x3(cfg.in_channels, ch[0], vb.pp("conv_in"))?,
            blocks,
            mid: MidBlock::new(vb.pp("mid_block"), ch[n - 1], cfg, kernels)?,
            norm_out: GroupNorm::load(g, ch[n - 1], VAE_EPS, kernels, vb.pp("conv_norm_out"))?,
            conv_out: conv3x3(ch[n - 1], 2 * cfg.latent_channels, vb.pp("conv_out"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = self.conv_in.forward(xs)?;
        for block in &self.blocks {
            for r in &block.resnets {
                xs = r.forward(&xs, None)?;
            }
            if let Some(conv) = &block.resample {
                let padded = xs
                    .pad_with_zeros(D::Minus1, 0, 1)?
                    .pad_with_zeros(D::Minus2, 0, 1)?;
                xs = conv.forward(&padded)?;
            }
        }
        let xs = self.mid.forward(&xs)?;
        self.conv_out.forward(&self.norm_out.forward(&xs, true)?)
    }
}

struct Decoder {
    conv_in: Conv2d,
    mid: MidBlock,
    blocks: Vec<CoderBlock>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(vb: VarBuilder, cfg: &VaeConfig, kernels: Kernels) -> Result<Self> {
        let rev: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let n = rev.len();
        let g = cfg.norm_num_groups;
        let mut blocks = Vec::with_capacity(n);
        for i in 0..n {
            let bvb = vb.pp("up_blocks").pp(i);
            let cin = if i == 0 { rev[0] } else { rev[i - 1] };
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| {
                    resnet(
                        bvb.pp("resnets").pp(j),
                        if j == 0 { cin } else { rev[i] },
                        rev[i],
                        g,
                        kernels,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let resample = if i + 1 < n {
                Some(conv3x3(
                    rev[i],
                    rev[i],
                    bvb.pp("upsamplers").pp(0).pp("conv"),
                )?)
            } else {
                None
            };
            blocks.push(CoderBlock { resnets, resample });
        }
        Ok(Self {
            conv_in: conv3x3(cfg.latent_channels, rev[0], vb.pp("conv_in"))?,
            mid: MidBlock::new(vb.pp("mid_block"), rev[0], cfg, kernels)?,
            blocks,
            norm_out: GroupNorm::load(g, rev[n - 1], VAE_EPS, kernels, vb.pp("conv_norm_out"))?,
            conv_out: conv3x3(rev[n - 1], cfg.out_channels, vb.pp("conv_out"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = self.mid.forward(&self.conv_in.forward(xs)?)?;
        for block in &self.blocks {
            for r in &block.resnets {
                xs = r.forward(&xs, None)?;
            }
            if let Some(conv) = &block.resample {
                let (_, _, h, w) = xs.dims4()?;
                xs = conv.forward(&xs.upsample_nearest2d(2 * h, 2 * w)?)?;
            }
        }
        self.conv_out.forward(&self.norm_out.forward(&xs, true)?)
    }
}

/// The encoder's output distribution over (unscaled) latents.
#[derive(Debug, Clone)]
pub struct LatentDist {
    pub mean: Tensor,
    pub std: Tensor,
}

impl LatentDist {
    /// `mean + std * noise`.
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        &self.mean + (&self.std * noise)?
    }
}

/// The VAE of an SD1.x model.
pub struct Vae {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    config: VaeConfig,
}

impl Vae {
    /// The VAE of `cfg` from `vb`'s weights, its group norms running `kernels`.
    pub fn new(vb: VarBuilder, cfg: &VaeConfig, kernels: Kernels) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::Msg)?;
        let lc = cfg.latent_channels;
        let conv1x1 = |cin: usize, cout: usize, name: &str| {
            conv2d(cin, cout, 1, Default::default(), vb.pp(name))
        };
        Ok(Self {
            encoder: Encoder::new(vb.pp("encoder"), cfg, kernels)?,
            decoder: Decoder::new(vb.pp("decoder"), cfg, kernels)?,
            quant_conv: if cfg.use_quant_conv {
                Some(conv1x1(2 * lc, 2 * lc, "quant_conv")?)
            } else {
                None
            },
            post_quant_conv: if cfg.use_post_quant_conv {
                Some(conv1x1(lc, lc, "post_quant_conv")?)
            } else {
                None
            },
            config: cfg.clone(),
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// `image`: (b, 3, H, W) in [-1, 1] -> the latent distribution, unscaled (not multiplied by
    /// the scaling factor).
    pub fn encode(&self, image: &Tensor) -> Result<LatentDist> {
        let mut h = self.encoder.forward(image)?;
        if let Some(q) = &self.quant_conv {
            h = q.forward(&h)?;
        }
        let lc = self.config.latent_channels;
        let mean = h.narrow(1, 0, lc)?;
        let logvar = h.narrow(1, lc, lc)?.clamp(-30f32, 20f32)?;
        let std = (logvar * 0.5)?.exp()?;
        Ok(LatentDist { mean, std })
    }

    /// Unscaled latents (b, latent_channels, h, w) -> image (b, 3, H, W), about [-1, 1], not
    /// clamped.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let latents = match &self.post_quant_conv {
            Some(p) => p.forward(latents)?,
            None => latents.clone(),
        };
        self.decoder.forward(&latents)
    }

    /// Latents as the UNet sees them -> unscaled latents: `z / scaling_factor + shift_factor`.
    pub fn unscale(&self, z: &Tensor) -> Result<Tensor> {
        (z / self.config.scaling_factor)? + self.config.shift_factor.unwrap_or(0.0)
    }

    /// Unscaled latents -> latents as the UNet sees them: `(z - shift_factor) * scaling_factor`.
    pub fn scale(&self, z: &Tensor) -> Result<Tensor> {
        (z - self.config.shift_factor.unwrap_or(0.0))? * self.config.scaling_factor
    }
}
