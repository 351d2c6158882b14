//! A frozen layer norm and a frozen linear layer as one op, for training: a transformer
//! block's `to_q(norm1(x))`, `to_k(norm1(x))`, `to_v(norm1(x))`, `to_q(norm2(x))` and
//! `ff.net.0.proj(norm3(x))`.
//!
//! candle's graph keeps every op's arguments, so op by op each norm's output stays to the end
//! of the backward pass only because the linear layers after it hold it (a frozen weight's
//! gradient, the one reader, is never taken): three activation-sized tensors per transformer
//! block (~0.55 GiB of an SD1.5 Infusion step at batch 4). This op keeps the norm's input,
//! which the residual add holds anyway, and its backward pass recomputes the statistics. The
//! forward arithmetic is the ops' own ([`LayerNorm::run`], [`Linear::run`]): the same result
//! to the bit.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use super::layer_norm::LayerNorm;
use super::linear::Linear;
use super::{cpu_f32, f32_data, f32_slice, grad_for, on_rows, with_f32};

/// The frozen layers: a layer norm (weight, bias `(k)`) and a linear layer (`(o, k)`, bias
/// `(o)`).
#[derive(Clone, Copy)]
pub struct NormLinear<'a> {
    pub norm_weight: &'a Tensor,
    pub norm_bias: &'a Tensor,
    pub eps: f64,
    pub weight: &'a Tensor,
    pub bias: Option<&'a Tensor>,
}

/// Whether [`norm_linear`] takes these: f32 on the CPU, every weight frozen (a weight that
/// trains needs its input kept).
pub fn applies(x: &Tensor, layers: &NormLinear) -> bool {
    cpu_f32(x)
        && x.rank() >= 1
        && layers.weight.rank() == 2
        && [layers.norm_weight, layers.norm_bias, layers.weight]
            .into_iter()
            .chain(layers.bias)
            .all(|t| cpu_f32(t) && !t.track_op())
}

/// `linear(layer_norm(x))` for `x (..., k)` -> `(..., o)`, differentiable in `x` (the weights
/// are frozen: see [`applies`]).
pub fn norm_linear(x: &Tensor, layers: &NormLinear) -> Result<Tensor> {
    let (o, k) = layers.weight.dims2()?;
    let fits = x.dims().last() == Some(&k)
        && layers.norm_weight.dims() == [k]
        && layers.norm_bias.dims() == [k]
        && layers.bias.is_none_or(|b| b.dims() == [o]);
    if !fits {
        candle_core::bail!(
            "layer norm + linear: input {:?}, norm {:?}, weight {:?}, bias {:?} do not fit",
            x.dims(),
            layers.norm_weight.dims(),
            layers.weight.dims(),
            layers.bias.map(|b| b.dims())
        );
    }
    let op = Op {
        norm: LayerNorm {
            eps: layers.eps as f32,
        },
        norm_weight: f32_data(layers.norm_weight)?,
        norm_bias: f32_data(layers.norm_bias)?,
        weight: layers.weight.contiguous()?,
        bias: layers.bias.map(f32_data).transpose()?,
    };
    on_rows(x, |x2| x2.apply_op1(op))
}

struct Op {
    norm: LayerNorm,
    norm_weight: Vec<f32>,
    norm_bias: Vec<f32>,
    weight: Tensor,
    bias: Option<Vec<f32>>,
}

impl CustomOp1 for Op {
    fn name(&self) -> &'static str {
        "cpu-norm-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, k) = l.shape().dims2()?;
        let (o, _) = self.weight.dims2()?;
        // The norm's output lives only as long as the product needs it.
        let normed = self
            .norm
            .run(f32_slice(s, l)?, &self.norm_weight, &self.norm_bias, k);
        let y = with_f32(&self.weight, |w| {
            Ok(Linear::run(&normed, w, self.bias.as_deref(), (rows, k, o)))
        })?;
        Ok((CpuStorage::F32(y), Shape::from((rows, o))))
    }

    /// The linear layer's input gradient, then the norm's (its statistics recomputed).
    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        if !x.track_op() {
            return Ok(None);
        }
        let (_, k) = x.dims2()?;
        let normed_grad = grad.matmul(&self.weight)?;
        let (dx, _, _) = self.norm.grads(
            &f32_data(x)?,
            &self.norm_weight,
            &f32_data(&normed_grad)?,
            k,
        );
        grad_for(x, dx)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Var;

    use super::*;
    use crate::sd::cpu::test_util::{grad_err, max_diff, randn};

    /// The op against the ops it fuses (our layer norm, our linear layer), forward to the bit
    /// and the input's gradient to 1e-5 relative (the same formulas, the same order but for
    /// the norm's dw/db the op skips): rows of 320 with a bias and of 7 without, more and fewer
    /// rows than the linear layer's transposed path takes (512), inputs off zero mean.
    #[test]
    fn matches_the_ops_it_fuses() {
        for (i, &(rows, k, o, biased)) in
            [(600, 320, 96, true), (30, 7, 5, false)].iter().enumerate()
        {
            let seed = 10 * i as u64;
            let x = Var::from_tensor(&randn(seed, &[2, rows / 2, k]).affine(2.0, 3.0).unwrap())
                .unwrap();
            let (nw, nb) = (randn(seed + 1, &[k]), randn(seed + 2, &[k]));
            let (w, b) = (randn(seed + 3, &[o, k]), randn(seed + 4, &[o]));
            let layers = NormLinear {
                norm_weight: &nw,
                norm_bias: &nb,
                eps: 1e-5,
                weight: &w,
                bias: biased.then_some(&b),
            };
            assert!(applies(x.as_tensor(), &layers));
            let ours = norm_linear(x.as_tensor(), &layers).unwrap();
            let normed =
                super::super::layer_norm::layer_norm(x.as_tensor(), &nw, &nb, 1e-5).unwrap();
            let theirs = super::super::linear::linear(&normed, &w, biased.then_some(&b)).unwrap();
            assert_eq!(ours.dims(), [2, rows / 2, o]);
            assert_eq!(max_diff(&ours, &theirs), 0.0, "case {i}: forward");
            let up = randn(seed + 5, ours.dims());
            let loss = |y: &Tensor| (y * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let err = grad_err(&loss(&ours), &loss(&theirs), x.as_tensor());
            assert!(err < 1e-5, "case {i}: input gradient {err}");
        }
    }

    /// A weight that trains is not this op's; misfit shapes are errors naming them.
    #[test]
    fn what_it_does_not_take() {
        let x = randn(1, &[3, 8]);
        let (nw, nb, w) = (randn(2, &[8]), randn(3, &[8]), randn(4, &[5, 8]));
        let trained = Var::from_tensor(&w).unwrap();
        let mut layers = NormLinear {
            norm_weight: &nw,
            norm_bias: &nb,
            eps: 1e-5,
            weight: trained.as_tensor(),
            bias: None,
        };
        assert!(!applies(&x, &layers), "a trained weight");
        layers.weight = &w;
        assert!(applies(&x, &layers));
        let odd = randn(5, &[3, 6]);
        let err = norm_linear(&odd, &layers).unwrap_err().to_string();
        assert!(err.contains("input [3, 6]"), "{err}");
    }
}
