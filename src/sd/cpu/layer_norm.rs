//! Layer norm over the last dimension on the CPU in f32, with its backward: per row, the mean
//! and then the variance in two vectorised passes, then one pass of `x^ w + b`. The backward
//! recomputes each row's statistics from the input, so in training a norm holds its input
//! instead of the composite's five activation-sized intermediates (candle's fused layer norm
//! has no backward, and its composite makes a fresh tensor per step).

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::exp::mean_rstd;
use super::uninit;

/// Whether [`layer_norm`] takes these: f32 on the CPU, gradients or not.
pub fn applies(x: &Tensor, w: &Tensor, b: &Tensor) -> bool {
    [x, w, b].iter().all(|t| super::cpu_f32(t)) && x.rank() >= 1
}

/// `x (..., d)` normalised over its last dimension, times `w (d)`, plus `b (d)`;
/// differentiable when any of them tracks gradients.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let dims = x.dims();
    let d = dims.last().copied().unwrap_or(0);
    if d == 0 || w.dims() != [d] || b.dims() != [d] {
        candle_core::bail!(
            "layer norm: input {dims:?}, weight {:?}, bias {:?}",
            w.dims(),
            b.dims()
        );
    }
    let op = LayerNorm { eps: eps as f32 };
    // candle records the op for the backward pass only where an argument tracks gradients.
    x.reshape((x.elem_count() / d, d))?
        .contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, op)?
        .reshape(dims)
}

pub(super) struct LayerNorm {
    pub(super) eps: f32,
}

impl LayerNorm {
    pub(super) fn run(&self, x: &[f32], w: &[f32], b: &[f32], d: usize) -> Vec<f32> {
        // SAFETY: every row of `y` is written whole from its row of `x`.
        let mut y = unsafe { uninit(x.len()) };
        y.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .for_each(|(yr, xr)| {
                let (mean, rstd) = mean_rstd(xr, self.eps);
                for (((y, &x), &w), &b) in yr.iter_mut().zip(xr).zip(w).zip(b) {
                    *y = (x - mean) * rstd * w + b;
                }
            });
        y
    }

    /// The gradients for `gy`: `(dx, dw, db)`. With `x^` the normalised row and `g = gy w`:
    /// `dx = rstd (g - mean(g) - x^ mean(g x^))`, `dw = sum gy x^`, `db = sum gy` over rows.
    pub(super) fn grads(
        &self,
        x: &[f32],
        w: &[f32],
        gy: &[f32],
        d: usize,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let mut dx = vec![0.0; x.len()];
        let rows_per_task = (x.len() / d)
            .div_ceil(4 * rayon::current_num_threads())
            .max(1);
        let partial: Vec<(Vec<f32>, Vec<f32>)> = dx
            .par_chunks_mut(rows_per_task * d)
            .zip(
                x.par_chunks(rows_per_task * d)
                    .zip(gy.par_chunks(rows_per_task * d)),
            )
            .map(|(dxs, (xs, gs))| {
                let (mut dw, mut db) = (vec![0.0f32; d], vec![0.0f32; d]);
                for ((dxr, xr), gr) in dxs
                    .chunks_exact_mut(d)
                    .zip(xs.chunks_exact(d))
                    .zip(gs.chunks_exact(d))
                {
                    let (mean, rstd) = mean_rstd(xr, self.eps);
                    let (mut sum_g, mut sum_gx) = (0.0f32, 0.0f32);
                    for i in 0..d {
                        let xh = (xr[i] - mean) * rstd;
                        dw[i] += gr[i] * xh;
                        db[i] += gr[i];
                        let g = gr[i] * w[i];
                        sum_g += g;
                        sum_gx += g * xh;
                    }
                    let (mg, mgx) = (sum_g / d as f32, sum_gx / d as f32);
                    for i in 0..d {
                        let xh = (xr[i] - mean) * rstd;
                        dxr[i] = rstd * (gr[i] * w[i] - mg - xh * mgx);
                    }
                }
                (dw, db)
            })
            .collect();
        let (mut dw, mut db) = (vec![0.0; d], vec![0.0; d]);
        for (pw, pb) in &partial {
            dw.iter_mut().zip(pw).for_each(|(a, b)| *a += b);
            db.iter_mut().zip(pb).for_each(|(a, b)| *a += b);
        }
        (dx, dw, db)
    }
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "cpu-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, b) = (
            super::f32_slice(s1, l1)?,
            super::f32_slice(s2, l2)?,
            super::f32_slice(s3, l3)?,
        );
        let (_, d) = l1.shape().dims2()?;
        Ok((CpuStorage::F32(self.run(x, w, b, d)), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        gy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (_, d) = x.dims2()?;
        let data = super::f32_data;
        let (dx, dw, db) = self.grads(&data(x)?, &data(w)?, &data(gy)?, d);
        let grad = super::grad_for;
        Ok((grad(x, dx)?, grad(w, dw)?, grad(b, db)?))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Var;

    use super::*;
    use crate::sd::cpu::test_util::{grad_err, max_diff, randn};

    /// Against candle's composite layer norm (`layer_norm_slow`), values to 2e-5 and, for the
    /// loss `sum(y * up)`, dx, dw and db to 1e-4 of the largest gradient: rows of 7 and of 320
    /// (not and a multiple of the 16 lanes), ranks 2 and 3, inputs off zero mean.
    #[test]
    fn matches_the_composite_with_gradients() {
        for (i, dims) in [vec![5, 7], vec![2, 33, 320]].iter().enumerate() {
            let d = *dims.last().unwrap();
            let noise = |s: u64, dims: &[usize]| randn(10 * i as u64 + s, dims);
            let x = Var::from_tensor(&((noise(0, dims) * 3.0).unwrap() + 1.5).unwrap()).unwrap();
            let w = Var::from_tensor(&noise(1, &[d])).unwrap();
            let b = Var::from_tensor(&noise(2, &[d])).unwrap();
            let up = noise(3, dims);
            let ours = layer_norm(&x, &w, &b, 1e-5).unwrap();
            let theirs = candle_nn::ops::layer_norm_slow(&x, &w, &b, 1e-5).unwrap();
            assert!(max_diff(&ours, &theirs) < 2e-5, "case {i}: values");
            let loss = |y: Tensor| (y * &up).unwrap().sum_all().unwrap();
            let (ours, theirs) = (
                loss(ours).backward().unwrap(),
                loss(theirs).backward().unwrap(),
            );
            for (name, v) in [("x", &x), ("w", &w), ("b", &b)] {
                let err = grad_err(&ours, &theirs, v);
                assert!(err < 1e-4, "case {i}, d{name}: {err}");
            }
        }
    }

    /// Shapes that do not fit are one error naming them.
    #[test]
    fn misfits_are_errors() {
        let err = layer_norm(&randn(1, &[3, 5]), &randn(2, &[4]), &randn(3, &[5]), 1e-5)
            .unwrap_err()
            .to_string();
        assert!(err.contains("[3, 5]") && err.contains("[4]"), "{err}");
    }
}
