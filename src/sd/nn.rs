//! Small layers and ops shared by the models.
//!
//! Fused candle kernels (`softmax_last_dim`, the fused layer norm) have no backward pass, so each
//! op here takes the fused path only when its input does not take part in a gradient
//! computation (`Tensor::track_op`), and the differentiable composite path otherwise. Inference
//! keeps the fast kernels; Infusion training backpropagates through the same model code.

use candle_core::{Tensor, D};
use candle_nn::{Conv2dConfig, LayerNorm, Module, VarBuilder};

use crate::sd::fused::group_norm::GroupNorm;
use crate::sd::fused::Kernels;

/// A 2-D convolution with candle_nn's weights (`weight`, `bias`) and config, run by
/// [`crate::sd::cpu::conv`] for f32 on the CPU and by candle elsewhere.
#[derive(Clone, Debug)]
pub struct Conv2d(candle_nn::Conv2d);

/// candle_nn's `conv2d` constructor, for [`Conv2d`].
pub fn conv2d(
    c_in: usize,
    c_out: usize,
    kernel: usize,
    cfg: Conv2dConfig,
    vb: VarBuilder,
) -> candle_core::Result<Conv2d> {
    candle_nn::conv2d(c_in, c_out, kernel, cfg, vb).map(Conv2d)
}

impl Conv2d {
    /// A layer of these weights (`weight (c_out, c_in, kh, kw)`).
    pub fn new(weight: Tensor, bias: Option<Tensor>, cfg: Conv2dConfig) -> Self {
        Self(candle_nn::Conv2d::new(weight, bias, cfg))
    }
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let (w, cfg) = (self.0.weight(), self.0.config());
        if !crate::sd::cpu::conv::applies(xs, w, cfg) {
            return self.0.forward(xs);
        }
        crate::sd::cpu::conv::conv2d(xs, w, self.0.bias(), cfg)
    }
}

/// A linear layer with candle_nn's weights (`weight`, `bias`), run by
/// [`crate::sd::cpu::linear`] (the bias inside the GEMM) for f32 on the CPU and by candle
/// elsewhere.
#[derive(Clone, Debug)]
pub struct Linear(candle_nn::Linear);

impl Linear {
    pub fn weight(&self) -> &Tensor {
        self.0.weight()
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.0.bias()
    }
}

/// candle_nn's `linear` constructor (with bias), for [`Linear`].
pub fn linear(c_in: usize, c_out: usize, vb: VarBuilder) -> candle_core::Result<Linear> {
    candle_nn::linear(c_in, c_out, vb).map(Linear)
}

/// candle_nn's `linear_no_bias` constructor, for [`Linear`].
pub fn linear_no_bias(c_in: usize, c_out: usize, vb: VarBuilder) -> candle_core::Result<Linear> {
    candle_nn::linear_no_bias(c_in, c_out, vb).map(Linear)
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let w = self.0.weight();
        if crate::sd::cpu::linear::applies(xs, w) {
            crate::sd::cpu::linear::linear(xs, w, self.0.bias())
        } else {
            self.0.forward(xs)
        }
    }
}

/// A layer norm over the last dimension with weight and bias (`weight`/`bias` names).
pub fn layer_norm(size: usize, eps: f64, vb: VarBuilder) -> candle_core::Result<LayerNorm> {
    let weight = vb.get(size, "weight")?;
    let bias = vb.get(size, "bias")?;
    Ok(LayerNorm::new(weight, bias, eps))
}

/// Applies a layer norm, differentiably when `xs` tracks gradients ([`crate::sd::cpu::layer_norm`]
/// for f32 on the CPU, with or without gradients).
pub fn norm(ln: &LayerNorm, xs: &Tensor) -> candle_core::Result<Tensor> {
    if let Some(bias) = ln.bias() {
        if crate::sd::cpu::layer_norm::applies(xs, ln.weight(), bias) {
            return crate::sd::cpu::layer_norm::layer_norm(xs, ln.weight(), bias, ln.eps());
        }
    }
    match ln.bias() {
        Some(bias) if xs.track_op() => {
            candle_nn::ops::layer_norm_slow(xs, ln.weight(), bias, ln.eps() as f32)
        }
        _ => ln.forward(xs),
    }
}

/// The input of linear layers: a tensor, or a layer norm's output on its way into them. Where
/// a graph is kept for frozen weights, each layer runs the norm and its product as one op
/// ([`crate::sd::cpu::norm_linear`]): the graph then keeps the norm's input instead of its
/// output. Otherwise the norm runs once, when first asked for.
pub struct LinearInput<'a> {
    xs: &'a Tensor,
    norm: Option<&'a LayerNorm>,
    normed: std::cell::OnceCell<Tensor>,
}

impl<'a> LinearInput<'a> {
    /// `xs` itself.
    pub fn plain(xs: &'a Tensor) -> Self {
        Self {
            xs,
            norm: None,
            normed: Default::default(),
        }
    }

    /// `norm(xs)` (see [`norm`]).
    pub fn normed(norm: &'a LayerNorm, xs: &'a Tensor) -> Self {
        Self {
            norm: Some(norm),
            ..Self::plain(xs)
        }
    }

    /// The input as a tensor (a hook that reads it, say).
    pub fn tensor(&self) -> candle_core::Result<&Tensor> {
        let Some(ln) = self.norm else {
            return Ok(self.xs);
        };
        if self.normed.get().is_none() {
            let _ = self.normed.set(norm(ln, self.xs)?);
        }
        Ok(self.normed.get().expect("set above"))
    }

    /// `layer(input)`.
    pub fn linear(&self, layer: &Linear) -> candle_core::Result<Tensor> {
        use crate::sd::cpu::norm_linear::{applies, norm_linear, NormLinear};
        if let Some((ln, norm_bias)) = self.norm.and_then(|ln| Some((ln, ln.bias()?))) {
            let layers = NormLinear {
                norm_weight: ln.weight(),
                norm_bias,
                eps: ln.eps(),
                weight: layer.weight(),
                bias: layer.bias(),
            };
            if self.xs.track_op() && applies(self.xs, &layers) {
                return norm_linear(self.xs, &layers);
            }
        }
        layer.forward(self.tensor()?)
    }
}

/// Softmax over the last dimension, differentiably when `xs` tracks gradients.
pub fn softmax_last_dim(xs: &Tensor) -> candle_core::Result<Tensor> {
    if xs.track_op() {
        candle_nn::ops::softmax(xs, D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(xs)
    }
}

/// SiLU, differentiable (candle's `silu` is a plain unary op with a backward).
pub fn silu(xs: &Tensor) -> candle_core::Result<Tensor> {
    candle_nn::ops::silu(xs)
}

/// Diffusers' `ResnetBlock2D` (`norm1`, `conv1`, `time_emb_proj`, `norm2`, `conv2`,
/// `conv_shortcut`), the op sequence of candle-transformers' block, with each group norm and
/// its SiLU as one [`GroupNorm`] call (fused when built with [`Kernels::Fused`]).
pub struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

/// The sizes of a [`ResnetBlock`].
#[derive(Debug, Clone, Copy)]
pub struct ResnetSpec {
    pub in_channels: usize,
    pub out_channels: usize,
    /// Width of the time embedding (`None`: no `time_emb_proj`, as in the VAE).
    pub temb_channels: Option<usize>,
    pub groups: usize,
    pub eps: f64,
    pub output_scale_factor: f64,
}

impl ResnetBlock {
    pub fn new(vb: VarBuilder, s: ResnetSpec, kernels: Kernels) -> candle_core::Result<Self> {
        let conv3 = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let (cin, cout) = (s.in_channels, s.out_channels);
        Ok(Self {
            norm1: GroupNorm::load(s.groups, cin, s.eps, kernels, vb.pp("norm1"))?,
            conv1: conv2d(cin, cout, 3, conv3, vb.pp("conv1"))?,
            time_emb_proj: s
                .temb_channels
                .map(|t| linear(t, cout, vb.pp("time_emb_proj")))
                .transpose()?,
            norm2: GroupNorm::load(s.groups, cout, s.eps, kernels, vb.pp("norm2"))?,
            conv2: conv2d(cout, cout, 3, conv3, vb.pp("conv2"))?,
            conv_shortcut: (cin != cout)
                .then(|| conv2d(cin, cout, 1, Default::default(), vb.pp("conv_shortcut")))
                .transpose()?,
            output_scale_factor: s.output_scale_factor,
        })
    }

    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(xs)?,
            None => xs.clone(),
        };
        let temb = match (temb, &self.time_emb_proj) {
            (Some(temb), Some(proj)) => Some(
                proj.forward(&silu(temb)?)?
                    .unsqueeze(D::Minus1)?
                    .unsqueeze(D::Minus1)?,
            ),
            _ => None,
        };
        let h = norm_conv_add(&self.norm1, &self.conv1, xs, temb.as_ref())?;
        // Dividing by 1 (SD's UNet and VAE) would cost a pass and, in training, a tensor kept.
        if self.output_scale_factor == 1.0 {
            norm_conv_add(&self.norm2, &self.conv2, &h, Some(&shortcut))
        } else {
            (norm_conv_add(&self.norm2, &self.conv2, &h, None)? + shortcut)?
                / self.output_scale_factor
        }
    }
}

/// `conv(silu(norm(xs))) + addend` (`addend` broadcast to the output). Where a graph is kept
/// for frozen weights, as one op that keeps only `xs` and the addend
/// ([`crate::sd::cpu::norm_conv`]); otherwise op by op.
fn norm_conv_add(
    norm: &GroupNorm,
    conv: &Conv2d,
    xs: &Tensor,
    addend: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    use crate::sd::cpu::norm_conv::{applies, norm_conv, NormConv};
    let layers = NormConv {
        norm_weight: norm.weight(),
        norm_bias: norm.bias(),
        groups: norm.groups(),
        eps: norm.eps(),
        weight: conv.0.weight(),
        bias: conv.0.bias(),
        cfg: conv.0.config(),
    };
    if xs.track_op() && applies(xs, &layers) {
        return norm_conv(xs, &layers, addend);
    }
    let h = conv.forward(&norm.forward(xs, true)?)?;
    match addend {
        Some(a) => a.broadcast_add(&h),
        None => Ok(h),
    }
}
