//! Group norm (optionally followed by SiLU) on the CPU in f32: per `(sample, group)`, the mean
//! and then the variance in two vectorised passes (the composite op's arithmetic: mean, then
//! the mean of squared deviations), then one pass per channel of `x * scale + shift` and SiLU.
//! candle's composite group norm makes about ten passes over the activations, each into a
//! fresh tensor.
//!
//! Training goes through the same op: its backward recomputes the statistics from the input,
//! so a norm holds its input for the backward pass instead of the composite's five or six
//! activation-sized intermediates (and SiLU's).

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::exp::{affine_silu, mean_rstd, norm_silu_grad};
use super::uninit;

/// Whether [`group_norm`] takes these: f32 on the CPU, gradients or not.
pub fn applies(x: &Tensor, w: &Tensor, b: &Tensor) -> bool {
    [x, w, b].iter().all(|t| super::cpu_f32(t)) && x.rank() >= 3
}

/// `x (b, c, ...)` normalised over `groups` groups of channels with weight and bias `(c)`,
/// then SiLU where `silu`.
pub fn group_norm(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let dims = x.dims();
    let (n, c) = (dims[0], dims[1]);
    if groups == 0 || c % groups != 0 || w.dims() != [c] || b.dims() != [c] {
        candle_core::bail!(
            "group norm of {groups} groups: input {dims:?}, weight {:?}, bias {:?}",
            w.dims(),
            b.dims()
        );
    }
    let hw = dims[2..].iter().product::<usize>();
    let op = GroupNorm {
        groups,
        eps: eps as f32,
        silu,
    };
    // candle records the op for the backward pass only where an argument tracks gradients.
    x.reshape((n, c, hw))?
        .contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, op)?
        .reshape(dims)
}

pub(super) struct GroupNorm {
    pub(super) groups: usize,
    pub(super) eps: f32,
    pub(super) silu: bool,
}

impl GroupNorm {
    pub(super) fn run(&self, x: &[f32], w: &[f32], b: &[f32], (c, hw): (usize, usize)) -> Vec<f32> {
        let cpg = c / self.groups;
        let len = cpg * hw;
        // SAFETY: each group's run of `y` is written whole from its run of `x`.
        let mut y = unsafe { uninit(x.len()) };
        y.par_chunks_mut(len)
            .zip(x.par_chunks(len))
            .enumerate()
            .for_each(|(run, (yg, xg))| {
                let g = run % self.groups;
                let (mean, rstd) = mean_rstd(xg, self.eps);
                for (i, (yc, xc)) in yg.chunks_exact_mut(hw).zip(xg.chunks_exact(hw)).enumerate() {
                    let ch = g * cpg + i;
                    let scale = rstd * w[ch];
                    affine_silu(xc, yc, scale, b[ch] - mean * scale, self.silu);
                }
            });
        y
    }

    /// The gradients of [`GroupNorm::run`] for `gy`: `(dx, dw, db)`. With `x^` the normalised
    /// input, `z = w x^ + b` and `dz` the gradient through SiLU (`s (1 + z (1 - s))`, `s` the
    /// sigmoid of `z`): `dw = sum dz x^`, `db = sum dz` per channel, and per group
    /// `dx = rstd (w dz - mean(w dz) - x^ mean(w dz x^))`.
    pub(super) fn grads(
        &self,
        x: &[f32],
        w: &[f32],
        b: &[f32],
        gy: &[f32],
        (c, hw): (usize, usize),
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let cpg = c / self.groups;
        let len = cpg * hw;
        let mut dx = vec![0.0; x.len()];
        // Per run (sample, group): each channel's sum of dz x^ and of dz.
        let per_run: Vec<Vec<(f32, f32)>> = dx
            .par_chunks_mut(len)
            .zip(x.par_chunks(len).zip(gy.par_chunks(len)))
            .enumerate()
            .map(|(run, (dxg, (xg, gg)))| {
                let g = run % self.groups;
                let (mean, rstd) = mean_rstd(xg, self.eps);
                let (mut sum_d, mut sum_dx) = (0.0f32, 0.0f32);
                let mut channels = Vec::with_capacity(cpg);
                for (i, ((dxc, xc), gc)) in dxg
                    .chunks_exact_mut(hw)
                    .zip(xg.chunks_exact(hw))
                    .zip(gg.chunks_exact(hw))
                    .enumerate()
                {
                    let ch = g * cpg + i;
                    let [dw, db, d, dx] =
                        norm_silu_grad(xc, gc, dxc, [mean, rstd, w[ch], b[ch]], self.silu);
                    sum_d += d;
                    sum_dx += dx;
                    channels.push((dw, db));
                }
                let (md, mdx) = (sum_d / len as f32, sum_dx / len as f32);
                for (d, &xv) in dxg.iter_mut().zip(xg) {
                    *d = rstd * (*d - md - (xv - mean) * rstd * mdx);
                }
                channels
            })
            .collect();
        let (mut dw, mut db) = (vec![0.0; c], vec![0.0; c]);
        for (run, channels) in per_run.iter().enumerate() {
            let g = run % self.groups;
            for (i, &(w, b)) in channels.iter().enumerate() {
                dw[g * cpg + i] += w;
                db[g * cpg + i] += b;
            }
        }
        (dx, dw, db)
    }
}

impl CustomOp3 for GroupNorm {
    fn name(&self) -> &'static str {
        "cpu-group-norm"
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
        let (_, c, hw) = l1.shape().dims3()?;
        Ok((
            CpuStorage::F32(self.run(x, w, b, (c, hw))),
            l1.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        gy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (_, c, hw) = x.dims3()?;
        let data = super::f32_data;
        let (dx, dw, db) = self.grads(&data(x)?, &data(w)?, &data(b)?, &data(gy)?, (c, hw));
        let grad = super::grad_for;
        Ok((grad(x, dx)?, grad(w, dw)?, grad(b, db)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sd::cpu::test_util::{grad_err, max_diff, randn};
    use crate::sd::fused::group_norm::GroupNorm as Layer;
    use crate::sd::fused::Kernels;

    /// Against candle's composite group norm (+ SiLU) to f32 rounding (2e-5 of values of size
    /// ~3): sizes whose channel runs are and are not multiples of the 16 lanes.
    #[test]
    fn matches_the_composite_group_norm() {
        for (i, dims) in [[2, 8, 5, 7], [1, 64, 16, 16], [1, 6, 3, 1]]
            .iter()
            .enumerate()
        {
            let noise = |s: u64, d: &[usize]| randn(10 * i as u64 + s, d);
            let x = ((noise(0, dims) * 2.0).unwrap() + 0.5).unwrap();
            let (w, b) = (noise(1, &[dims[1]]), noise(2, &[dims[1]]));
            let groups = dims[1] / 2;
            for silu in [false, true] {
                let ours = group_norm(&x, &w, &b, groups, 1e-5, silu).unwrap();
                let layer = Layer::new(w.clone(), b.clone(), groups, 1e-5, Kernels::Naive).unwrap();
                let theirs = layer.composite(&x).unwrap();
                let theirs = if silu {
                    candle_nn::ops::silu(&theirs).unwrap()
                } else {
                    theirs
                };
                let err = max_diff(&ours, &theirs);
                assert!(err < 2e-5, "case {i}, silu {silu}: {err}");
            }
        }
    }

    /// The backward pass against candle's composite (+ SiLU) differentiated by candle, for the
    /// loss `sum(y * up)`: dx, dw and db to 1e-4 of the largest gradient (sums over up to 512
    /// elements per group), with and without SiLU; two samples, so dw and db add over them.
    #[test]
    fn gradients_match_the_composite() {
        use candle_core::Var;
        for (i, dims) in [[2, 8, 5, 7], [2, 64, 4, 4]].iter().enumerate() {
            let noise = |s: u64, d: &[usize]| randn(10 * i as u64 + s, d);
            let x = Var::from_tensor(&((noise(0, dims) * 2.0).unwrap() + 0.5).unwrap()).unwrap();
            let w = Var::from_tensor(&noise(1, &[dims[1]])).unwrap();
            let b = Var::from_tensor(&noise(2, &[dims[1]])).unwrap();
            let up = noise(3, dims);
            let groups = dims[1] / 2;
            let loss = |y: Tensor| (y * &up).unwrap().sum_all().unwrap();
            for silu in [false, true] {
                let ours = group_norm(&x, &w, &b, groups, 1e-5, silu).unwrap();
                let ours = loss(ours).backward().unwrap();
                let layer = Layer::new(
                    w.as_tensor().clone(),
                    b.as_tensor().clone(),
                    groups,
                    1e-5,
                    Kernels::Naive,
                )
                .unwrap();
                let theirs = layer.composite(&x).unwrap();
                let theirs = if silu {
                    candle_nn::ops::silu(&theirs).unwrap()
                } else {
                    theirs
                };
                let theirs = loss(theirs).backward().unwrap();
                for (name, v) in [("x", &x), ("w", &w), ("b", &b)] {
                    let err = grad_err(&ours, &theirs, v);
                    assert!(err < 1e-4, "case {i}, silu {silu}, d{name}: {err}");
                }
            }
        }
    }
}
