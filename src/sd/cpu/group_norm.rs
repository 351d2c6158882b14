//! Group norm (optionally followed by SiLU) on the CPU in f32: per `(sample, group)`, the mean
//! and then the variance in two vectorised passes (the composite op's arithmetic: mean, then
//! the mean of squared deviations), then one pass per channel of `x * scale + shift` and SiLU.
//! candle's composite group norm makes about ten passes over the activations, each into a
//! fresh tensor.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::exp::{affine_silu, sum, sum_sq};
use super::uninit;

/// Whether [`group_norm`] takes these: f32 on the CPU, nothing tracking gradients.
pub fn applies(x: &Tensor, w: &Tensor, b: &Tensor) -> bool {
    [x, w, b]
        .iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && !t.track_op())
        && x.rank() >= 3
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
    x.reshape((n, c, hw))?
        .contiguous()?
        .apply_op3_no_bwd(
            &w.contiguous()?,
            &b.contiguous()?,
            &GroupNorm {
                groups,
                eps: eps as f32,
                silu,
            },
        )?
        .reshape(dims)
}

struct GroupNorm {
    groups: usize,
    eps: f32,
    silu: bool,
}

impl GroupNorm {
    fn run(&self, x: &[f32], w: &[f32], b: &[f32], (c, hw): (usize, usize)) -> Vec<f32> {
        let cpg = c / self.groups;
        let len = cpg * hw;
        // SAFETY: each group's run of `y` is written whole from its run of `x`.
        let mut y = unsafe { uninit(x.len()) };
        y.par_chunks_mut(len)
            .zip(x.par_chunks(len))
            .enumerate()
            .for_each(|(run, (yg, xg))| {
                let g = run % self.groups;
                let mean = sum(xg) / len as f32;
                let var = sum_sq(xg, mean) / len as f32;
                let rstd = 1.0 / (var + self.eps).sqrt();
                for (i, (yc, xc)) in yg.chunks_exact_mut(hw).zip(xg.chunks_exact(hw)).enumerate() {
                    let ch = g * cpg + i;
                    let scale = rstd * w[ch];
                    affine_silu(xc, yc, scale, b[ch] - mean * scale, self.silu);
                }
            });
        y
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sd::cpu::test_util::{max_diff, randn};
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
}
