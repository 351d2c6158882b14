//! Small layers and ops shared by the models.
//!
//! Fused candle kernels (`softmax_last_dim`, the fused layer norm) have no backward pass, so each
//! op here takes the fused path only when its input does not take part in a gradient
//! computation (`Tensor::track_op`), and the differentiable composite path otherwise. Inference
//! keeps the fast kernels; Infusion training backpropagates through the same model code.

use candle_core::{Tensor, D};
use candle_nn::{LayerNorm, Module, VarBuilder};

/// A layer norm over the last dimension with weight and bias (`weight`/`bias` names).
pub fn layer_norm(size: usize, eps: f64, vb: VarBuilder) -> candle_core::Result<LayerNorm> {
    let weight = vb.get(size, "weight")?;
    let bias = vb.get(size, "bias")?;
    Ok(LayerNorm::new(weight, bias, eps))
}

/// Applies a layer norm, differentiably when `xs` tracks gradients.
pub fn norm(ln: &LayerNorm, xs: &Tensor) -> candle_core::Result<Tensor> {
    match ln.bias() {
        Some(bias) if xs.track_op() => {
            candle_nn::ops::layer_norm_slow(xs, ln.weight(), bias, ln.eps() as f32)
        }
        _ => ln.forward(xs),
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
