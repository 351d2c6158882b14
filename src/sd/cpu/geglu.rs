//! GEGLU's product on the CPU in f32: `h (..., 2 n)` -> `h[..., :n] * gelu(h[..., n:])` (the
//! exact, erf GELU) in one vectorised pass. candle's composite takes three (the GELU of a
//! strided half, then the product), each into a fresh tensor as large as the feed-forward's
//! activations (`(4, 4096, 1280)` at SD1.5's first level, batch 4). In training the op keeps
//! only its input for the backward pass (the composite kept the GELU and the product too).

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::exp::{gelu_mul, gelu_mul_grad};
use super::{f32_slice, uninit};

/// Whether [`geglu`] takes this: f32 on the CPU, gradients or not.
pub fn applies(h: &Tensor) -> bool {
    h.device().is_cpu() && h.dtype() == DType::F32 && h.rank() >= 1
}

/// `h (..., 2 n)` -> `(..., n)`: the first half times the GELU of the second.
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    let dims = h.dims();
    let Some((&last, outer)) = dims.split_last().filter(|(&last, _)| last % 2 == 0) else {
        candle_core::bail!("geglu: the last dimension of {dims:?} is not even");
    };
    let rows = outer.iter().product::<usize>();
    // candle records the op for the backward pass only where the input tracks gradients.
    let y = h.reshape((rows, last))?.contiguous()?.apply_op1(Geglu)?;
    let mut out = outer.to_vec();
    out.push(last / 2);
    y.reshape(out)
}

struct Geglu;

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "cpu-geglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let h = f32_slice(s, l)?;
        let (rows, two_n) = l.shape().dims2()?;
        let n = two_n / 2;
        // SAFETY: `gelu_mul` writes each row of `n`, and the rows cover the buffer.
        let mut out = unsafe { uninit(rows * n) };
        if n > 0 {
            out.par_chunks_mut(n)
                .zip(h.par_chunks(two_n))
                .for_each(|(o, row)| gelu_mul(&row[..n], &row[n..], o));
        }
        Ok((CpuStorage::F32(out), Shape::from((rows, n))))
    }

    /// `dh = [dy gelu(g), dy a gelu'(g)]`, `gelu'(g) = Phi(g) + g phi(g)`.
    fn bwd(&self, h: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let (rows, two_n) = h.dims2()?;
        let n = two_n / 2;
        let (hs, dy) = (super::f32_data(h)?, super::f32_data(dy)?);
        let mut dh = vec![0.0f32; rows * two_n];
        if n > 0 {
            dh.par_chunks_mut(two_n)
                .zip(hs.par_chunks(two_n).zip(dy.par_chunks(n)))
                .for_each(|(d, (row, dy))| {
                    let (da, dg) = d.split_at_mut(n);
                    gelu_mul_grad(&row[..n], &row[n..], dy, da, dg);
                });
        }
        super::grad_for(h, dh)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sd::cpu::test_util::{grad_err, max_diff, randn};

    /// Against candle's composite (`a * gelu_erf(g)` on the two halves), to 2e-6 of values of
    /// size ~3 (the vectorised erf is within 5e-7 of erf): widths that are and are not
    /// multiples of the 16 lanes, rank 2 and 3.
    #[test]
    fn matches_the_composite() {
        for (i, dims) in [[3usize, 5, 34], [1, 2, 64], [2, 7, 2]].iter().enumerate() {
            let h = randn(i as u64, dims);
            let half = dims[2] / 2;
            let (a, g) = (
                h.narrow(2, 0, half).unwrap(),
                h.narrow(2, half, half).unwrap(),
            );
            let theirs = (a * g.gelu_erf().unwrap()).unwrap();
            let ours = geglu(&h).unwrap();
            assert_eq!(ours.dims(), theirs.dims());
            let err = max_diff(&ours, &theirs);
            assert!(err < 2e-6, "case {i}: {err}");
        }
        let flat = randn(9, &[4, 6]);
        assert_eq!(geglu(&flat).unwrap().dims(), &[4, 3]);
        let odd = randn(9, &[4, 5]);
        assert!(geglu(&odd).unwrap_err().to_string().contains("[4, 5]"));
    }

    /// The backward pass against the composite differentiated by candle, for the loss
    /// `sum(y * up)`: dh to 1e-5 of the largest gradient (the vectorised erf is within 5e-7).
    #[test]
    fn gradients_match_the_composite() {
        let h = candle_core::Var::from_tensor(&(randn(1, &[3, 5, 34]) * 2.0).unwrap()).unwrap();
        let up = randn(2, &[3, 5, 17]);
        let loss = |y: Tensor| (y * &up).unwrap().sum_all().unwrap();
        let ours = loss(geglu(&h).unwrap()).backward().unwrap();
        let (a, g) = (h.narrow(2, 0, 17).unwrap(), h.narrow(2, 17, 17).unwrap());
        let theirs = loss((a * g.gelu_erf().unwrap()).unwrap())
            .backward()
            .unwrap();
        let err = grad_err(&ours, &theirs, &h);
        assert!(err < 1e-5, "{err}");
    }
}
