//! CLIP's QuickGELU, `x * sigmoid(1.702 x)`, on the CPU in f32: one vectorised pass over
//! chunks in parallel. candle's composite took three (a scale, candle_nn's sigmoid, whose
//! scalar `exp` ran on one thread, and the product): a third of the text encoder's time
//! outside its GEMMs. In training the op keeps only its input for the backward pass.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::exp::{quick_gelu as forward, quick_gelu_grad};
use super::{f32_slice, uninit};

/// Elements per parallel chunk.
const CHUNK: usize = 1 << 14;

/// Whether [`quick_gelu`] takes this: f32 on the CPU, gradients or not.
pub fn applies(x: &Tensor) -> bool {
    super::cpu_f32(x)
}

/// `x * sigmoid(1.702 x)` elementwise, differentiable.
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(QuickGelu)
}

struct QuickGelu;

impl CustomOp1 for QuickGelu {
    fn name(&self) -> &'static str {
        "cpu-quick-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l)?;
        // SAFETY: the chunks cover the buffer and `forward` writes each whole.
        let mut out = unsafe { uninit(x.len()) };
        out.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(y, x)| forward(x, y));
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let (xs, dy) = (super::f32_data(x)?, super::f32_data(dy)?);
        let mut dx = vec![0f32; xs.len()];
        dx.par_chunks_mut(CHUNK)
            .zip(xs.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK)))
            .for_each(|(d, (x, g))| quick_gelu_grad(x, g, d));
        super::grad_for(x, dx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sd::cpu::test_util::{grad_err, max_abs, max_diff, randn};
    use candle_core::Var;

    /// candle's composite (`x * sigmoid(1.702 x)`), forward and backward.
    fn composite(x: &Tensor) -> Tensor {
        (x * candle_nn::ops::sigmoid(&(x * 1.702).unwrap()).unwrap()).unwrap()
    }

    /// The op against candle's composite: values within 1e-6 relative to the largest (our
    /// `exp` is Cephes' polynomial, 2 ulp), and the input's gradient for a random output
    /// gradient within 1e-5 relative, over lengths that leave partial lanes and chunks.
    #[test]
    fn matches_candles_composite_with_its_gradient() {
        for (seed, dims) in [
            (1u64, vec![3usize, 77, 40]),
            (2, vec![2, 17]),
            (3, vec![70_001]),
        ] {
            let x = (randn(seed, &dims) * 4.0).unwrap();
            let theirs = composite(&x);
            let err = max_diff(&quick_gelu(&x).unwrap(), &theirs) / max_abs(&theirs);
            assert!(err < 1e-6, "{dims:?}: {err}");

            let v = Var::from_tensor(&x).unwrap();
            let g = randn(seed + 10, &dims);
            let ours = (quick_gelu(v.as_tensor()).unwrap() * &g)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let theirs = (composite(v.as_tensor()) * &g)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let err = grad_err(&ours, &theirs, v.as_tensor());
            assert!(err < 1e-5, "{dims:?} gradient: {err}");
        }
    }
}
