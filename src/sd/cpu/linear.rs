//! `x w^T + b` on the CPU in f32 as one GEMM whose destination starts as the bias rows, so the
//! bias costs no pass of its own. candle's `Linear` adds it in a second op, into a fresh
//! tensor: for the feed-forward's `(4, 4096, 2560)` output at batch 4 that pass cost half as
//! much as the GEMM. The backward pass is the usual three products.

use candle_core::{CpuStorage, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{apply_biased, f32_slice, on_rows, sgemm, uninit, BiasedOp, Mat};

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
    if dims.last() != Some(&k) || b.is_some_and(|b| b.dims() != [o]) {
        candle_core::bail!(
            "linear: input {dims:?}, weight {:?}, bias {:?}",
            w.dims(),
            b.map(|b| b.dims())
        );
    }
    on_rows(x, |x2| apply_biased(x2, &w.contiguous()?, b, Linear))
}

pub(super) struct Linear;

impl Linear {
    /// `x (rows, k)`, `w (o, k)`, `b (o)` -> `(rows, o)`.
    ///
    /// Both operands run along `k`, so gemm packs one of them for its kernel, and it packs the
    /// weight whole, on one thread, each call: with few rows (the text encoder's 154, the
    /// UNet's deepest levels) that copy costs about as much as the products (SD1.5's `fc2`,
    /// 154 x 3072 -> 768: 12.4 ms against 3.8 ms). Up to [`FEW_ROWS`] rows the input goes in
    /// transposed instead, padded to whole vectors, which gemm reads in place, and the small
    /// result is transposed back (notes/cpu.md, "The text encoder").
    pub(super) fn run(
        x: &[f32],
        w: &[f32],
        b: Option<&[f32]>,
        (rows, k, o): (usize, usize, usize),
    ) -> Vec<f32> {
        if rows > FEW_ROWS || k == 0 || o == 0 {
            return Self::row_major(x, w, b, (rows, k, o));
        }
        let padded = rows.next_multiple_of(16);
        let mut xt = vec![0.0; k * padded];
        super::transpose(x, (rows, k), k, &mut xt, padded, true);
        // SAFETY: every element is set to the bias or zero before the GEMM adds to it.
        let mut yt = unsafe { uninit(o * padded) };
        yt.par_chunks_mut(padded).enumerate().for_each(|(j, col)| {
            col.fill(b.map_or(0.0, |b| b[j]));
        });
        // SAFETY: xt (k, padded) row-major read as its transpose (padded, k); yt (o, padded)
        // row-major written as (padded, o); w (o, k) read as w^T (k, o).
        unsafe {
            sgemm(
                (padded, o, k),
                Mat::cols(yt.as_mut_ptr(), padded),
                Mat::cols(xt.as_ptr(), padded),
                Mat::cols(w.as_ptr(), k),
                true,
                rayon::current_num_threads(),
            )
        };
        // SAFETY: every element is written by the transpose.
        let mut out = unsafe { uninit(rows * o) };
        super::transpose(&yt, (o, rows), padded, &mut out, o, true);
        out
    }

    /// The product into a row-major destination that starts as the bias rows.
    fn row_major(
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

/// Up to this many rows [`Linear::run`] multiplies the transposed input (measured on SD1.5's
/// shapes: 154 to 512 rows gained 15-70%; from 2048 rows it lost up to 10%).
const FEW_ROWS: usize = 512;

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

    /// The gradient of `x (rows, k)` for `grad (rows, o)`, `w (o, k)`.
    fn input_grad(&self, _x: &Tensor, w: &Tensor, grad: &Tensor) -> Result<Tensor> {
        grad.matmul(w)
    }

    /// The gradient of `w (o, k)` for `grad (rows, o)`, `x (rows, k)`.
    fn weight_grad(&self, x: &Tensor, _w: &Tensor, grad: &Tensor) -> Result<Tensor> {
        grad.t()?.matmul(x)
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

    /// Few rows take the transposed input (padded to 16 rows; the tiled transposes here cross
    /// tile edges: 40 and 154 rows, 70 outputs), many rows the row-major destination. Both
    /// are candle_nn's `Linear` to 2e-5, with and without bias.
    #[test]
    fn both_paths_match_candles_linear() {
        let w = randn(1, &[70, 37]);
        let b = randn(2, &[70]);
        for rows in [40, 154, FEW_ROWS + 3] {
            let x = randn(3, &[rows, 37]);
            for bias in [None, Some(&b)] {
                let ours = linear(&x, &w, bias).unwrap();
                let theirs = candle_nn::Linear::new(w.clone(), bias.cloned())
                    .forward(&x)
                    .unwrap();
                let err = max_diff(&ours, &theirs);
                assert!(err < 2e-5, "rows {rows}, bias {}: {err}", bias.is_some());
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

    /// A frozen weight and bias get no gradient (candle would keep it to the end of the
    /// backward pass); the input's is still candle's to 2e-5.
    #[test]
    fn frozen_weights_get_no_gradient() {
        let x = Var::from_tensor(&randn(1, &[2, 5, 7])).unwrap();
        let (w, b) = (randn(2, &[3, 7]), randn(3, &[3]));
        let up = randn(4, &[2, 5, 3]);
        let grads = (linear(x.as_tensor(), &w, Some(&b)).unwrap() * &up)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(grads.get(&w).is_none() && grads.get(&b).is_none());
        let expected = up.reshape((10, 3)).unwrap().matmul(&w).unwrap();
        let got = grads.get(&x).unwrap().reshape((10, 7)).unwrap();
        assert!(max_diff(&got, &expected) < 2e-5);
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
