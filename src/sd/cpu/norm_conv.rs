//! A frozen group norm + SiLU, a frozen convolution and an addend as one op, for training:
//! a ResNet block's `conv1(silu(norm1(x))) + temb` and `conv2(silu(norm2(h))) + shortcut`.
//!
//! candle's graph keeps every op's arguments to the end of the backward pass. Op by op, a
//! half-block keeps the norm's output (the convolution's input, which only the kernel's
//! gradient reads) and the convolution's output (which only the add holds): two
//! activation-sized tensors that a model whose weights are frozen never reads again (~0.75 GiB
//! of an SD1.5 Infusion step at batch 4). This op keeps the norm's input and the addend, which
//! the block holds anyway, and its backward pass recomputes the norm's statistics. The forward
//! arithmetic is the ops' own ([`GroupNorm::run`], [`Conv::run`], then the add), so the result
//! is the same to the bit.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use candle_nn::Conv2dConfig;
use rayon::prelude::*;

use super::conv::Conv;
use super::group_norm::GroupNorm;
use super::{cpu_f32, f32_data, f32_slice, grad_for, with_f32, BiasedOp};

/// The frozen layers: a group norm (weight, bias `(c_in)`, followed by SiLU) and a
/// convolution (`(c_out, c_in, kh, kw)`, bias `(c_out)`).
pub struct NormConv<'a> {
    pub norm_weight: &'a Tensor,
    pub norm_bias: &'a Tensor,
    pub groups: usize,
    pub eps: f64,
    pub weight: &'a Tensor,
    pub bias: Option<&'a Tensor>,
    pub cfg: &'a Conv2dConfig,
}

impl NormConv<'_> {
    fn weights(&self) -> impl Iterator<Item = &Tensor> {
        [self.norm_weight, self.norm_bias, self.weight]
            .into_iter()
            .chain(self.bias)
    }
}

/// Whether [`norm_conv`] takes these: f32 on the CPU, every weight frozen (a weight that
/// trains needs its input kept), a stride-1 convolution of one group.
pub fn applies(x: &Tensor, layers: &NormConv) -> bool {
    cpu_f32(x)
        && x.rank() == 4
        && layers.weight.rank() == 4
        && layers.weights().all(|t| cpu_f32(t) && !t.track_op())
        && (layers.cfg.stride, layers.cfg.dilation, layers.cfg.groups) == (1, 1, 1)
}

/// `conv(silu(group_norm(x))) + addend`, differentiable in `x` and `addend` (the weights are
/// frozen: see [`applies`]). `addend` is `(b, c_out, 1, 1)` (a per-image bias, the time
/// embedding) or the output's shape (a residual).
pub fn norm_conv(x: &Tensor, layers: &NormConv, addend: Option<&Tensor>) -> Result<Tensor> {
    let (_, c_in, _, _) = x.dims4()?;
    let (c_out, wc_in, _, _) = layers.weight.dims4()?;
    let bad_norm = layers.groups == 0
        || c_in % layers.groups != 0
        || layers.norm_weight.dims() != [c_in]
        || layers.norm_bias.dims() != [c_in];
    if c_in != wc_in || bad_norm || layers.bias.is_some_and(|b| b.dims() != [c_out]) {
        candle_core::bail!(
            "norm + conv2d: input {:?}, norm {:?} in {} groups, kernel {:?}, bias {:?} do not fit",
            x.dims(),
            layers.norm_weight.dims(),
            layers.groups,
            layers.weight.dims(),
            layers.bias.map(|b| b.dims())
        );
    }
    let op = Op {
        norm: GroupNorm {
            groups: layers.groups,
            eps: layers.eps as f32,
            silu: true,
        },
        norm_weight: f32_data(layers.norm_weight)?,
        norm_bias: f32_data(layers.norm_bias)?,
        conv: Conv::new(layers.cfg),
        weight: layers.weight.contiguous()?,
        bias: layers.bias.map(f32_data).transpose()?,
    };
    let x = x.contiguous()?;
    match addend {
        Some(a) => x.apply_op2(&a.contiguous()?, op),
        None => x.apply_op1(op),
    }
}

struct Op {
    norm: GroupNorm,
    norm_weight: Vec<f32>,
    norm_bias: Vec<f32>,
    conv: Conv,
    weight: Tensor,
    bias: Option<Vec<f32>>,
}

impl Op {
    /// The norm, then the convolution (the norm's output dropped as soon as it is read).
    fn run(&self, x: &[f32], shape: &Shape) -> Result<(Vec<f32>, Shape)> {
        let (_, c, h, w) = shape.dims4()?;
        let normed = self
            .norm
            .run(x, &self.norm_weight, &self.norm_bias, (c, h * w));
        with_f32(&self.weight, |k| {
            self.conv.run(
                (&normed, shape),
                (k, self.weight.shape()),
                self.bias.as_deref(),
            )
        })
    }

    /// The gradient of `x` for the output's gradient `grad`, where `x` tracks gradients: the
    /// convolution's input gradient, then the norm's (its statistics recomputed from `x`).
    fn input_grad(&self, x: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        if !x.track_op() {
            return Ok(None);
        }
        // The kernel's input gradient reads only the shape of its input: `x`'s is the norm's.
        let normed_grad = self.conv.input_grad(x, &self.weight, grad)?;
        let (_, c, h, w) = x.dims4()?;
        let (dx, _, _) = self.norm.grads(
            &f32_data(x)?,
            &self.norm_weight,
            &self.norm_bias,
            &f32_data(&normed_grad)?,
            (c, h * w),
        );
        grad_for(x, dx)
    }
}

impl CustomOp1 for Op {
    fn name(&self) -> &'static str {
        "cpu-norm-conv2d"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (out, shape) = self.run(f32_slice(s, l)?, l.shape())?;
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        self.input_grad(x, grad)
    }
}

impl CustomOp2 for Op {
    fn name(&self) -> &'static str {
        "cpu-norm-conv2d-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (mut out, shape) = self.run(f32_slice(s1, l1)?, l1.shape())?;
        let (b, c, h, w) = shape.dims4()?;
        let addend = f32_slice(s2, l2)?;
        let plane = h * w;
        match l2.dims() {
            [ab, ac, 1, 1] if (*ab, *ac) == (b, c) => out
                .par_chunks_mut(plane)
                .zip(addend)
                .for_each(|(o, &a)| o.iter_mut().for_each(|v| *v += a)),
            dims if dims == shape.dims() => out
                .par_chunks_mut(plane)
                .zip(addend.par_chunks(plane))
                .for_each(|(o, a)| o.iter_mut().zip(a).for_each(|(v, &a)| *v += a)),
            dims => candle_core::bail!(
                "norm + conv2d: an addend of shape {dims:?} fits neither {:?} nor ({b}, {c}, 1, 1)",
                shape.dims()
            ),
        }
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        addend: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let addend_grad = match addend.track_op() {
            false => None,
            true if addend.dims() == grad.dims() => Some(grad.clone()),
            true => Some(grad.sum_keepdim((2, 3))?),
        };
        Ok((self.input_grad(x, grad)?, addend_grad))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Var;

    use super::*;
    use crate::sd::cpu::test_util::{grad_err, max_abs, max_diff, randn};

    /// The op against the ops it fuses (our group norm + SiLU, our convolution, candle's
    /// broadcast add), forward to the bit and gradients of the input and the addend to 1e-5
    /// relative (the same formulas summed in another order): 3x3 padded on 32x32 (Winograd's
    /// path) with a per-image addend and with a residual, 3x3 on 8x8 (im2col's) with none.
    #[test]
    fn matches_the_ops_it_fuses() {
        let cases: [(usize, usize, usize, &str); 3] = [
            (32, 8, 6, "per-image"),
            (32, 8, 8, "residual"),
            (8, 4, 6, "none"),
        ];
        for (i, &(hw, c_in, c_out, addend_kind)) in cases.iter().enumerate() {
            let seed = 10 * i as u64;
            let x = Var::from_tensor(&randn(seed, &[2, c_in, hw, hw]).affine(3.0, 1.0).unwrap())
                .unwrap();
            let (nw, nb) = (randn(seed + 1, &[c_in]), randn(seed + 2, &[c_in]));
            let (w, b) = (
                randn(seed + 3, &[c_out, c_in, 3, 3]),
                randn(seed + 4, &[c_out]),
            );
            let addend = match addend_kind {
                "per-image" => Some(randn(seed + 5, &[2, c_out, 1, 1])),
                "residual" => Some(randn(seed + 5, &[2, c_out, hw, hw])),
                _ => None,
            }
            .map(|a| Var::from_tensor(&a).unwrap());
            let cfg = Conv2dConfig {
                padding: 1,
                ..Default::default()
            };
            let layers = NormConv {
                norm_weight: &nw,
                norm_bias: &nb,
                groups: 4,
                eps: 1e-5,
                weight: &w,
                bias: Some(&b),
                cfg: &cfg,
            };
            assert!(applies(x.as_tensor(), &layers));
            let a = addend.as_ref().map(|a| a.as_tensor());
            let ours = norm_conv(x.as_tensor(), &layers, a).unwrap();
            let normed =
                super::super::group_norm::group_norm(x.as_tensor(), &nw, &nb, 4, 1e-5, true)
                    .unwrap();
            let conv = super::super::conv::conv2d(&normed, &w, Some(&b), &cfg).unwrap();
            let theirs = match a {
                Some(a) => a.broadcast_add(&conv).unwrap(),
                None => conv,
            };
            assert_eq!(max_diff(&ours, &theirs), 0.0, "case {i}: forward");
            let up = randn(seed + 6, ours.dims());
            let loss = |y: &Tensor| (y * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let (ours, theirs) = (loss(&ours), loss(&theirs));
            let err = grad_err(&ours, &theirs, x.as_tensor());
            assert!(err < 1e-5, "case {i}: input gradient {err}");
            if let Some(a) = &addend {
                let err = grad_err(&ours, &theirs, a.as_tensor());
                assert!(err < 1e-5, "case {i}: addend gradient {err}");
            }
            assert!(max_abs(ours.get(x.as_tensor()).unwrap()) > 0.0);
        }
    }

    /// A weight that trains, a stride-2 convolution: not this op's (the caller keeps the ops);
    /// misfit shapes are errors naming them.
    #[test]
    fn what_it_does_not_take() {
        let x = randn(1, &[1, 4, 8, 8]);
        let (nw, nb) = (randn(2, &[4]), randn(3, &[4]));
        let w = randn(4, &[6, 4, 3, 3]);
        let cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let trained = Var::from_tensor(&w).unwrap();
        let mut layers = NormConv {
            norm_weight: &nw,
            norm_bias: &nb,
            groups: 2,
            eps: 1e-5,
            weight: trained.as_tensor(),
            bias: None,
            cfg: &cfg,
        };
        assert!(!applies(&x, &layers), "a trained kernel");
        layers.weight = &w;
        assert!(applies(&x, &layers));
        let strided = Conv2dConfig { stride: 2, ..cfg };
        assert!(!applies(
            &x,
            &NormConv {
                cfg: &strided,
                ..layers
            }
        ));
        let odd = randn(5, &[1, 6, 8, 8]);
        let err = norm_conv(&odd, &layers, None).unwrap_err().to_string();
        assert!(err.contains("input [1, 6, 8, 8]"), "{err}");
        let addend = randn(6, &[1, 6, 4, 4]);
        let err = norm_conv(&x, &layers, Some(&addend))
            .unwrap_err()
            .to_string();
        assert!(err.contains("addend of shape [1, 6, 4, 4]"), "{err}");
    }
}
