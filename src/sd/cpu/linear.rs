//! `x w^T + b` on the CPU in f32 as one GEMM whose destination starts as the bias rows, so the
//! bias costs no pass of its own. candle's `Linear` adds it in a second op, into a fresh
//! tensor: for the feed-forward's `(4, 4096, 2560)` output at batch 4 that pass cost half as
//! much as the GEMM. The backward pass is the usual three products.

use candle_core::{CpuStorage, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{apply_biased, f32_slice, sgemm, uninit, BiasedOp, Mat};

/// Whether [`linear`] takes these: f32 on the CPU, a `(out, in)` weight.
pub fn applies(x: &Tensor, w: &Tensor) -> bool {
    x.device().is_cpu()
        && x.dtype() == DType::F32
        && w.dtype() == DType::F32
        && w.rank() == 2
        && x.rank() >= 1
}

/// `x (..., in)` times `w (out, in)` transposed, plus `b (out)` -> `(..., out)`.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let (o, k) = w.dims2()?;
    let dims = x.dims();
    let bias_fits = b.is_none_or(|b| b.dims() == [o]);
    let Some((&last, outer)) = dims
        .split_last()
        .filter(|(&last, _)| last == k && bias_fits)
    else {
        candle_core::bail!(
            "linear: input {dims:?}, weight {:?}, bias {:?}",
            w.dims(),
            b.map(|b| b.dims())
        );
    };
    let rows = outer.iter().product::<usize>();
    let x2 = x.reshape((rows, last))?.contiguous()?;
    let y = apply_biased(&x2, &w.contiguous()?, b, Linear)?;
    let mut out = outer.to_vec();
    out.push(o);
    y.reshape(out)
}

struct Linear;

impl Linear {
    /// `x (rows, k)`, `w (o, k)`, `b (o)` -> `(rows, o)`.
    fn run(
        x: &[f32],
        w: &[f32],
        b: Option<&[f32]>,
        (rows, k, o): (usize, usize, usize),
    ) -> Vec<f32> {
        // SAFETY: filled with the bias, or zeros, or written whole by the GEMM (accumulate =
        // false) below.
        let mut out = unsafe { uninit(rows * o) };
        if out.is_empty() {
            return out;
        }
        match b {
            Some(b) => out.par_chunks_mut(o).for_each(|r| r.copy_from_slice(b)),
            None if k == 0 => out.fill(0.0),
            None => {}
        }
        if k > 0 {
            // SAFETY: x (rows, k) and out (rows, o) row-major; w (o, k) read as w^T (k, o):
            // element (i, j) at j*k + i.
            unsafe {
                sgemm(
                    (rows, o, k),
                    Mat::rows(out.as_mut_ptr(), o),
                    Mat::rows(x.as_ptr(), k),
                    Mat::cols(w.as_ptr(), k),
                    b.is_some(),
                    rayon::current_num_threads(),
                )
            };
        }
        out
    }
}

impl BiasedOp for Linear {
    fn name(&self) -> &'static str {
        "cpu-linear"
    }

    fn fwd(
        &self,
        (s1, l1): (&CpuStorage, &Layout),
        (s2, l2): (&CpuStorage, &Layout),
        b: Option<&[f32]>,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, k) = l1.shape().dims2()?;
        let (o, _) = l2.shape().dims2()?;
        let y = Self::run(f32_slice(s1, l1)?, f32_slice(s2, l2)?, b, (rows, k, o));
        Ok((CpuStorage::F32(y), Shape::from((rows, o))))
    }

    /// The gradients of `x (rows, k)` and `w (o, k)` for `grad (rows, o)`.
    fn grads(&self, x: &Tensor, w: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((grad.matmul(w)?, grad.t()?.matmul(x)?))
    }

    fn bias_grad(&self, grad: &Tensor) -> Result<Tensor> {
        grad.sum(0)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Module, Var};

    use super::*;
    use crate::sd::cpu::test_util::{max_diff, randn};

    /// Against candle_nn's `Linear` (matmul, then the bias added), to f32 rounding (2e-5 on
    /// sums of 37 products of unit normals): with and without bias, rank 2, 3 and 4 inputs, a
    /// transposed (not contiguous) input and widths that are not multiples of gemm's tiles.
    /// candle_nn's layer is handed a contiguous copy: on the transposed rank-3 view itself,
    /// candle 0.11.1's batched matmul returns wrong values (off by ~25 here).
    #[test]
    fn matches_candles_linear() {
        let w = randn(1, &[19, 37]);
        let b = randn(2, &[19]);
        let inputs = [
            randn(3, &[5, 37]),
            randn(4, &[2, 7, 37]),
            randn(5, &[2, 3, 4, 37]),
            randn(6, &[2, 37, 6]).transpose(1, 2).unwrap(),
        ];
        for (i, x) in inputs.iter().enumerate() {
            for bias in [None, Some(&b)] {
                let ours = linear(x, &w, bias).unwrap();
                let theirs = candle_nn::Linear::new(w.clone(), bias.cloned())
                    .forward(&x.contiguous().unwrap())
                    .unwrap();
                assert_eq!(ours.dims(), theirs.dims(), "input {i}");
                let err = max_diff(&ours, &theirs);
                assert!(err < 2e-5, "input {i}, bias {}: {err}", bias.is_some());
            }
        }
    }

    /// The gradients of input, weight and bias are candle's (same loss through candle_nn's
    /// `Linear`) to 2e-5.
    #[test]
    fn gradients_are_candles() {
        let x = Var::from_tensor(&randn(1, &[2, 5, 7])).unwrap();
        let w = Var::from_tensor(&randn(2, &[3, 7])).unwrap();
        let b = Var::from_tensor(&randn(3, &[3])).unwrap();
        let up = randn(4, &[2, 5, 3]);
        let loss = |y: Tensor| (y * &up).unwrap().sum_all().unwrap();
        let ours = loss(linear(x.as_tensor(), w.as_tensor(), Some(b.as_tensor())).unwrap())
            .backward()
            .unwrap();
        let layer = candle_nn::Linear::new(w.as_tensor().clone(), Some(b.as_tensor().clone()));
        let theirs = loss(layer.forward(x.as_tensor()).unwrap())
            .backward()
            .unwrap();
        for v in [&x, &w, &b] {
            let (a, t) = (ours.get(v).unwrap(), theirs.get(v).unwrap());
            assert_eq!(a.dims(), t.dims());
            assert!(max_diff(a, t) < 2e-5);
        }
    }

    /// Shapes that do not fit are one error naming them, not a panic.
    #[test]
    fn misfits_are_errors() {
        let w = randn(1, &[4, 6]);
        let err = linear(&randn(2, &[3, 5]), &w, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("[3, 5]") && err.contains("[4, 6]"), "{err}");
        let err = linear(&randn(2, &[3, 6]), &w, Some(&randn(3, &[5])))
            .unwrap_err()
            .to_string();
        assert!(err.contains("bias"), "{err}");
    }
}
