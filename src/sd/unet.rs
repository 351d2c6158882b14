//! The SD1.x UNet (diffusers `UNet2DConditionModel`), with the attention hook inside it.
//!
//! Weight paths match diffusers exactly, so stock files load unchanged; every size comes from
//! [`UNetConfig`]. candle-transformers' timestep embedding is reused as it is; the ResNet block is
//! ours ([`ResnetBlock`]) so its group norms can run fused.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{Conv2dConfig, LayerNorm, VarBuilder};

use crate::sd::nn::{conv2d, linear, Conv2d, Linear};
use candle_transformers::models::stable_diffusion::embeddings::{TimestepEmbedding, Timesteps};

use crate::sd::attention::{Attention, AttnKind, LayerInfo};
use crate::sd::config::UNetConfig;
use crate::sd::fused::group_norm::GroupNorm;
use crate::sd::fused::Kernels;
use crate::sd::hook::HookCtx;
use crate::sd::nn::{layer_norm, LinearInput, ResnetBlock, ResnetSpec};

/// Diffusers' `Transformer2DModel` uses a fixed group-norm epsilon.
const TRANSFORMER_NORM_EPS: f64 = 1e-6;
/// `BasicTransformerBlock`'s layer norms.
const BLOCK_NORM_EPS: f64 = 1e-5;

struct FeedForward {
    proj_in: Linear,
    proj_out: Linear,
    /// The two linears' paths (`...ff.net.0.proj`, `...ff.net.2`), for a module hook.
    paths: [String; 2],
}

impl FeedForward {
    /// GEGLU feed-forward with an inner width of 4 * dim (`ff.net.0.proj`, `ff.net.2`).
    fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        let inner = dim * 4;
        let (a, b) = (vb.pp("net").pp(0).pp("proj"), vb.pp("net").pp(2));
        Ok(Self {
            paths: [a.prefix(), b.prefix()],
            proj_in: linear(dim, inner * 2, a)?,
            proj_out: linear(inner, dim, b)?,
        })
    }

    fn forward(&self, xs: &LinearInput<'_>, hook: Option<&HookCtx<'_>>) -> Result<Tensor> {
        let h = module(hook, &self.paths[0], xs, &self.proj_in)?;
        let (w, b) = (self.proj_out.weight(), self.proj_out.bias());
        // The product and the projection as one op, where no hook looks at the product.
        if crate::sd::cpu::geglu::applies(&h)
            && crate::sd::cpu::linear::applies(&h, w)
            && !hook.is_some_and(|h| h.wants_module(&self.paths[1]))
        {
            return crate::sd::cpu::geglu::geglu_linear(&h, w, b);
        }
        // diffusers' GEGLU uses the exact (erf) GELU.
        let product = if crate::sd::cpu::geglu::applies(&h) {
            crate::sd::cpu::geglu::geglu(&h)?
        } else {
            let half = h.dim(D::Minus1)? / 2;
            let hidden = h.narrow(D::Minus1, 0, half)?;
            let gate = h.narrow(D::Minus1, half, half)?;
            (hidden * gate.gelu_erf()?)?
        };
        module(
            hook,
            &self.paths[1],
            &LinearInput::plain(&product),
            &self.proj_out,
        )
    }
}

/// `linear(xs)`, changed by the hook's module seam where it wants `path`.
fn module(
    hook: Option<&HookCtx<'_>>,
    path: &str,
    xs: &LinearInput<'_>,
    linear: &Linear,
) -> Result<Tensor> {
    let out = xs.linear(linear)?;
    match hook {
        Some(h) if h.wants_module(path) => h.module(path, xs.tensor()?, out),
        _ => Ok(out),
    }
}

struct TransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl TransformerBlock {
    fn new(vb: VarBuilder, spec: &BlockSpec) -> Result<Self> {
        let (dim, heads, k) = (spec.channels, spec.heads, spec.kernels);
        let head_dim = dim / heads;
        let cross_dim = Some(spec.cross_dim);
        Ok(Self {
            norm1: layer_norm(dim, BLOCK_NORM_EPS, vb.pp("norm1"))?,
            attn1: Attention::new(vb.pp("attn1"), dim, None, heads, head_dim, k)?,
            norm2: layer_norm(dim, BLOCK_NORM_EPS, vb.pp("norm2"))?,
            attn2: Attention::new(vb.pp("attn2"), dim, cross_dim, heads, head_dim, k)?,
            norm3: layer_norm(dim, BLOCK_NORM_EPS, vb.pp("norm3"))?,
            ff: FeedForward::new(vb.pp("ff"), dim)?,
        })
    }

    fn forward(
        &self,
        xs: &Tensor,
        context: &Tensor,
        spatial: (usize, usize),
        hook: Option<&HookCtx<'_>>,
    ) -> Result<Tensor> {
        let xs =
            (self
                .attn1
                .forward(&LinearInput::normed(&self.norm1, xs), None, spatial, hook)?
                + xs)?;
        let xs = (self.attn2.forward(
            &LinearInput::normed(&self.norm2, &xs),
            Some(context),
            spatial,
            hook,
        )? + xs)?;
        self.ff
            .forward(&LinearInput::normed(&self.norm3, &xs), hook)?
            + xs
    }
}

enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

/// Diffusers' `Transformer2DModel` (the `attentions.N` modules).
struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<TransformerBlock>,
    proj_out: Projection,
    /// `proj_in`'s and `proj_out`'s paths, for a module hook.
    paths: [String; 2],
}

impl SpatialTransformer {
    /// The transformer of the blocks `spec` describes (`spec.depth` transformer blocks).
    fn new(vb: VarBuilder, spec: &BlockSpec, cfg: &UNetConfig) -> Result<Self> {
        let channels = spec.channels;
        let proj = |name: &str| -> Result<Projection> {
            Ok(if cfg.use_linear_projection {
                Projection::Linear(linear(channels, channels, vb.pp(name))?)
            } else {
                Projection::Conv(conv2d(
                    channels,
                    channels,
                    1,
                    Default::default(),
                    vb.pp(name),
                )?)
            })
        };
        let blocks = (0..spec.depth)
            .map(|i| TransformerBlock::new(vb.pp("transformer_blocks").pp(i), spec))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: GroupNorm::load(
                cfg.norm_num_groups,
                channels,
                TRANSFORMER_NORM_EPS,
                spec.kernels,
                vb.pp("norm"),
            )?,
            proj_in: proj("proj_in")?,
            blocks,
            proj_out: proj("proj_out")?,
            paths: [vb.pp("proj_in").prefix(), vb.pp("proj_out").prefix()],
        })
    }

    fn forward(&self, xs: &Tensor, context: &Tensor, hook: Option<&HookCtx<'_>>) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let residual = xs;
        let xs = self.norm.forward(xs, false)?;
        let to_tokens = |t: &Tensor| t.permute((0, 2, 3, 1))?.reshape((b, h * w, c));
        let mut xs_in = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(&conv.forward(&xs)?)?,
            Projection::Linear(lin) => lin.forward(&to_tokens(&xs)?)?,
        };
        if let Some(ctx) = hook.filter(|c| c.wants_module(&self.paths[0])) {
            xs_in = ctx.module(&self.paths[0], &to_tokens(&xs)?, xs_in)?;
        }
        let mut xs = xs_in;
        for block in &self.blocks {
            xs = block.forward(&xs, context, (h, w), hook)?;
        }
        let to_map = |t: &Tensor| t.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?.contiguous();
        let out = match (
            &self.proj_out,
            hook.filter(|c| c.wants_module(&self.paths[1])),
        ) {
            (Projection::Conv(conv), None) => conv.forward(&to_map(&xs)?)?,
            (Projection::Conv(conv), Some(ctx)) => {
                let out = to_tokens(&conv.forward(&to_map(&xs)?)?)?;
                to_map(&ctx.module(&self.paths[1], &xs, out)?)?
            }
            (Projection::Linear(lin), ctx) => {
                let out = lin.forward(&xs)?;
                let out = match ctx {
                    Some(ctx) => ctx.module(&self.paths[1], &xs, out)?,
                    None => out,
                };
                to_map(&out)?
            }
        };
        out + residual
    }
}

/// A down, mid or up block: ResNet blocks, optionally each followed by a spatial transformer.
struct Block {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<SpatialTransformer>,
    /// Stride-2 conv (down blocks) or nearest-upsample + conv (up blocks).
    resample: Option<Conv2d>,
    /// Down blocks: pad right and bottom by one before a stride-2 conv with padding 0.
    pad_before_resample: bool,
}

/// What the blocks at one depth of the UNet share.
struct BlockSpec {
    channels: usize,
    heads: usize,
    depth: usize,
    cross_dim: usize,
    has_attention: bool,
    kernels: Kernels,
}

impl BlockSpec {
    /// The spec of depth `i` (0 = the outermost down block and the last up block).
    fn of(cfg: &UNetConfig, i: usize, has_attention: bool, kernels: Kernels) -> Self {
        Self {
            channels: cfg.block_out_channels[i],
            heads: cfg.heads().get(i),
            depth: cfg.transformer_layers_per_block.get(i),
            cross_dim: cfg.cross_attention_dim.get(i),
            has_attention,
            kernels,
        }
    }
}

impl Block {
    fn attentions(
        vb: &VarBuilder,
        n: usize,
        spec: &BlockSpec,
        cfg: &UNetConfig,
    ) -> Result<Vec<SpatialTransformer>> {
        if !spec.has_attention {
            return Ok(vec![]);
        }
        (0..n)
            .map(|i| SpatialTransformer::new(vb.pp("attentions").pp(i), spec, cfg))
            .collect()
    }

    /// A ResNet block of `spec`'s depth from `in_channels` to `out_channels`.
    fn resnet(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        spec: &BlockSpec,
        cfg: &UNetConfig,
        output_scale_factor: f64,
    ) -> Result<ResnetBlock> {
        ResnetBlock::new(
            vb,
            ResnetSpec {
                in_channels,
                out_channels,
                temb_channels: Some(cfg.time_embed_dim()),
                groups: cfg.norm_num_groups,
                eps: cfg.norm_eps,
                output_scale_factor,
            },
            spec.kernels,
        )
    }

    fn down(
        vb: VarBuilder,
        in_channels: usize,
        n_layers: usize,
        spec: &BlockSpec,
        add_downsample: bool,
        cfg: &UNetConfig,
    ) -> Result<Self> {
        let resnets = (0..n_layers)
            .map(|i| {
                let cin = if i == 0 { in_channels } else { spec.channels };
                Self::resnet(vb.pp("resnets").pp(i), cin, spec.channels, spec, cfg, 1.0)
            })
            .collect::<Result<Vec<_>>>()?;
        let resample = if add_downsample {
            let conv_cfg = Conv2dConfig {
                stride: 2,
                padding: cfg.downsample_padding,
                ..Default::default()
            };
            Some(conv2d(
                spec.channels,
                spec.channels,
                3,
                conv_cfg,
                vb.pp("downsamplers").pp(0).pp("conv"),
            )?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions: Self::attentions(&vb, n_layers, spec, cfg)?,
            resample,
            pad_before_resample: cfg.downsample_padding == 0,
        })
    }

    fn mid(vb: VarBuilder, spec: &BlockSpec, cfg: &UNetConfig) -> Result<Self> {
        let resnets = (0..2)
            .map(|i| {
                Self::resnet(
                    vb.pp("resnets").pp(i),
                    spec.channels,
                    spec.channels,
                    spec,
                    cfg,
                    cfg.mid_block_scale_factor,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            resnets,
            attentions: Self::attentions(&vb, 1, spec, cfg)?,
            resample: None,
            pad_before_resample: false,
        })
    }

    /// `skip_channels[j]`: channels of the skip connection concatenated before resnet j.
    fn up(
        vb: VarBuilder,
        prev_channels: usize,
        skip_channels: &[usize],
        spec: &BlockSpec,
        add_upsample: bool,
        cfg: &UNetConfig,
    ) -> Result<Self> {
        let resnets = skip_channels
            .iter()
            .enumerate()
            .map(|(j, &skip)| {
                let cin = if j == 0 { prev_channels } else { spec.channels };
                Self::resnet(
                    vb.pp("resnets").pp(j),
                    cin + skip,
                    spec.channels,
                    spec,
                    cfg,
                    1.0,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let resample = if add_upsample {
            let conv_cfg = Conv2dConfig {
                padding: 1,
                ..Default::default()
            };
            Some(conv2d(
                spec.channels,
                spec.channels,
                3,
                conv_cfg,
                vb.pp("upsamplers").pp(0).pp("conv"),
            )?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions: Self::attentions(&vb, skip_channels.len(), spec, cfg)?,
            resample,
            pad_before_resample: false,
        })
    }

    fn attention_layers(&self) -> impl Iterator<Item = &LayerInfo> {
        self.attention_modules().map(Attention::info)
    }

    fn attention_modules(&self) -> impl Iterator<Item = &Attention> {
        self.attentions
            .iter()
            .flat_map(|a| a.blocks.iter())
            .flat_map(|b| [&b.attn1, &b.attn2])
    }

    /// Returns the output and the states after each layer (and after the downsampler).
    fn forward_down(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        hook: Option<&HookCtx<'_>>,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut xs = xs.clone();
        let mut states = Vec::with_capacity(self.resnets.len() + 1);
        for (i, resnet) in self.resnets.iter().enumerate() {
            xs = resnet.forward(&xs, Some(temb))?;
            if let Some(attn) = self.attentions.get(i) {
                xs = attn.forward(&xs, context, hook)?;
            }
            states.push(xs.clone());
        }
        if let Some(conv) = &self.resample {
            if self.pad_before_resample {
                xs = xs
                    .pad_with_zeros(D::Minus1, 0, 1)?
                    .pad_with_zeros(D::Minus2, 0, 1)?;
            }
            xs = conv.forward(&xs)?;
            states.push(xs.clone());
        }
        Ok((xs, states))
    }

    fn forward_mid(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        hook: Option<&HookCtx<'_>>,
    ) -> Result<Tensor> {
        let mut xs = self.resnets[0].forward(xs, Some(temb))?;
        for (attn, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            xs = attn.forward(&xs, context, hook)?;
            xs = resnet.forward(&xs, Some(temb))?;
        }
        Ok(xs)
    }

    /// `skips`: the states to concatenate, the last one first; `upsample_to`: the size of the
    /// next block's skip connection.
    fn forward_up(
        &self,
        xs: &Tensor,
        skips: &mut Vec<Tensor>,
        temb: &Tensor,
        context: &Tensor,
        hook: Option<&HookCtx<'_>>,
    ) -> Result<Tensor> {
        let mut xs = xs.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            let skip = skips
                .pop()
                .ok_or_else(|| candle_core::Error::Msg("UNet skip connections exhausted".into()))?;
            xs = resnet.forward(&Tensor::cat(&[&xs, &skip], 1)?, Some(temb))?;
            if let Some(attn) = self.attentions.get(i) {
                xs = attn.forward(&xs, context, hook)?;
            }
        }
        if let Some(conv) = &self.resample {
            let (h, w) = match skips.last() {
                Some(next) => {
                    let (_, _, h, w) = next.dims4()?;
                    (h, w)
                }
                None => {
                    let (_, _, h, w) = xs.dims4()?;
                    (2 * h, 2 * w)
                }
            };
            xs = conv.forward(&xs.upsample_nearest2d(h, w)?)?;
        }
        Ok(xs)
    }
}

/// The SD1.x UNet.
pub struct UNet {
    time_proj: Timesteps,
    time_embedding: TimestepEmbedding,
    conv_in: Conv2d,
    down: Vec<Block>,
    mid: Block,
    up: Vec<Block>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    config: UNetConfig,
}

impl UNet {
    /// The UNet of `cfg` from `vb`'s weights, its attention layers and group norms running
    /// `kernels`.
    pub fn new(vb: VarBuilder, cfg: &UNetConfig, kernels: Kernels) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::Msg)?;
        let n = cfg.n_blocks();
        let ch = &cfg.block_out_channels;
        let c0 = ch[0];
        let conv_in = conv2d(
            cfg.in_channels,
            c0,
            cfg.conv_in_kernel,
            Conv2dConfig {
                padding: (cfg.conv_in_kernel - 1) / 2,
                ..Default::default()
            },
            vb.pp("conv_in"),
        )?;
        let time_proj = Timesteps::new(c0, cfg.flip_sin_to_cos, cfg.freq_shift);
        let time_embedding =
            TimestepEmbedding::new(vb.pp("time_embedding"), c0, cfg.time_embed_dim())?;
        let (down, mut skip_channels) = Self::down_blocks(&vb, cfg, kernels)?;
        let mid_spec = BlockSpec::of(cfg, n - 1, true, kernels);
        let mid = Block::mid(vb.pp("mid_block"), &mid_spec, cfg)?;
        let up = Self::up_blocks(&vb, cfg, kernels, &mut skip_channels)?;
        Ok(Self {
            time_proj,
            time_embedding,
            conv_in,
            down,
            mid,
            up,
            conv_norm_out: GroupNorm::load(
                cfg.norm_num_groups,
                c0,
                cfg.norm_eps,
                kernels,
                vb.pp("conv_norm_out"),
            )?,
            conv_out: conv2d(
                c0,
                cfg.out_channels,
                cfg.conv_out_kernel,
                Conv2dConfig {
                    padding: (cfg.conv_out_kernel - 1) / 2,
                    ..Default::default()
                },
                vb.pp("conv_out"),
            )?,
            config: cfg.clone(),
        })
    }

    /// The down blocks, and the channels of the skip connections they leave (`conv_in`'s first).
    fn down_blocks(
        vb: &VarBuilder,
        cfg: &UNetConfig,
        kernels: Kernels,
    ) -> Result<(Vec<Block>, Vec<usize>)> {
        let n = cfg.n_blocks();
        let ch = &cfg.block_out_channels;
        let mut down = Vec::with_capacity(n);
        let mut skip_channels = vec![ch[0]];
        for i in 0..n {
            let cin = if i == 0 { ch[0] } else { ch[i - 1] };
            let attention = cfg.down_block_types[i] == "CrossAttnDownBlock2D";
            let spec = BlockSpec::of(cfg, i, attention, kernels);
            let layers = cfg.layers_per_block.get(i);
            let downsample = i + 1 < n;
            down.push(Block::down(
                vb.pp("down_blocks").pp(i),
                cin,
                layers,
                &spec,
                downsample,
                cfg,
            )?);
            skip_channels.extend(std::iter::repeat_n(ch[i], layers + usize::from(downsample)));
        }
        Ok((down, skip_channels))
    }

    /// The up blocks, deepest first, each taking its skip connections off the end of
    /// `skip_channels`.
    fn up_blocks(
        vb: &VarBuilder,
        cfg: &UNetConfig,
        kernels: Kernels,
        skip_channels: &mut Vec<usize>,
    ) -> Result<Vec<Block>> {
        let n = cfg.n_blocks();
        let mut up = Vec::with_capacity(n);
        let mut prev = cfg.block_out_channels[n - 1];
        for i in 0..n {
            // Up block i mirrors depth n - 1 - i.
            let depth = n - 1 - i;
            let n_layers = cfg.layers_per_block.get(depth) + 1;
            let take = skip_channels.split_off(skip_channels.len().saturating_sub(n_layers));
            if take.len() != n_layers {
                candle_core::bail!(
                    "UNet config gives up block {i} more layers than skip connections"
                );
            }
            let skips: Vec<usize> = take.into_iter().rev().collect();
            let attention = cfg.up_block_types[i] == "CrossAttnUpBlock2D";
            let spec = BlockSpec::of(cfg, depth, attention, kernels);
            let channels = spec.channels;
            up.push(Block::up(
                vb.pp("up_blocks").pp(i),
                prev,
                &skips,
                &spec,
                i + 1 < n,
                cfg,
            )?);
            prev = channels;
        }
        Ok(up)
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// The attention layers a UNet of this config has, without building its weights.
    pub fn attention_layers_of(cfg: &UNetConfig) -> Result<Vec<LayerInfo>> {
        let unet = crate::sd::weights::build_meta(|vb| UNet::new(vb, cfg, Kernels::default()))?;
        Ok(unet.attention_layers().into_iter().cloned().collect())
    }

    /// The attention layer at `path` (`down_blocks.0.attentions.0.transformer_blocks.0.attn2`).
    pub fn attention(&self, path: &str) -> Option<&Attention> {
        self.down
            .iter()
            .chain(std::iter::once(&self.mid))
            .chain(&self.up)
            .flat_map(Block::attention_modules)
            .find(|a| a.info().path == path)
    }

    /// Every attention layer, in the order the UNet runs them.
    /// The cross-attention layers, in [`UNet::attention_layers`]' order.
    pub fn cross_attention_layers(&self) -> Vec<LayerInfo> {
        self.attention_layers()
            .into_iter()
            .filter(|l| l.kind == AttnKind::CrossAttention)
            .cloned()
            .collect()
    }

    /// The cross-attention layer at `path`, if it is one.
    pub fn cross_attention(&self, path: &str) -> Option<&Attention> {
        self.attention(path)
            .filter(|a| a.info().kind == AttnKind::CrossAttention)
    }

    pub fn attention_layers(&self) -> Vec<&LayerInfo> {
        self.down
            .iter()
            .chain(std::iter::once(&self.mid))
            .chain(&self.up)
            .flat_map(Block::attention_layers)
            .collect()
    }

    /// Predicts the noise. `sample`: (b, c, h, w); `timesteps`: a scalar or one value per row;
    /// `context`: (b, tokens, cross_dim). `hook` observes or changes the attention layers.
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        hook: Option<&HookCtx<'_>>,
    ) -> Result<Tensor> {
        let (b, _, _, _) = sample.dims4()?;
        let dtype = sample.dtype();
        let t = timesteps.to_dtype(DType::F32)?;
        let t = match t.rank() {
            0 => t.broadcast_as(b)?.contiguous()?,
            1 if t.dim(0)? == b => t,
            1 if t.dim(0)? == 1 => t.broadcast_as(b)?.contiguous()?,
            _ => candle_core::bail!(
                "timesteps have shape {:?}, expected a scalar or {b} values",
                timesteps.dims()
            ),
        };
        if context.dim(0)? != b {
            candle_core::bail!("{} text states for a batch of {b} latents", context.dim(0)?);
        }
        let emb = self.time_proj.forward(&t)?.to_dtype(dtype)?;
        let emb = self.time_embedding.forward(&emb)?;

        let sample = if self.config.center_input_sample {
            ((sample * 2.0)? - 1.0)?
        } else {
            sample.clone()
        };
        let mut xs = self.conv_in.forward(&sample)?;
        let mut skips = vec![xs.clone()];
        for block in &self.down {
            let (out, states) = block.forward_down(&xs, &emb, context, hook)?;
            xs = out;
            skips.extend(states);
        }
        xs = self.mid.forward_mid(&xs, &emb, context, hook)?;
        for block in &self.up {
            xs = block.forward_up(&xs, &mut skips, &emb, context, hook)?;
        }
        let xs = self.conv_norm_out.forward(&xs, true)?;
        self.conv_out.forward(&xs)
    }
}
