//! GEGLU's product on the CPU in f32: `h (..., 2 n)` -> `h[..., :n] * gelu(h[..., n:])` (the
//! exact, erf GELU) in one vectorised pass. candle's composite takes three (the GELU of a
//! strided half, then the product), each into a fresh tensor as large as the feed-forward's
//! activations (`(4, 4096, 1280)` at SD1.5's first level, batch 4). In training the op keeps
//! only its input for the backward pass (the composite kept the GELU and the product too).
//! [`geglu_linear`] runs the product and the feed-forward's output projection as one op.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::exp::{gelu_mul, gelu_mul_grad};
use super::linear::Linear;
use super::{f32_slice, on_rows, uninit, with_scratch, BiasedOp};

/// Whether [`geglu`] takes this: f32 on the CPU, gradients or not.
pub fn applies(h: &Tensor) -> bool {
    super::cpu_f32(h) && h.rank() >= 1
}

/// `h (..., 2 n)` -> `(..., n)`: the first half times the GELU of the second.
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    let dims = h.dims();
    if dims.last().is_none_or(|last| last % 2 != 0) {
        candle_core::bail!("geglu: the last dimension of {dims:?} is not even");
    }
    // candle records the op for the backward pass only where the input tracks gradients.
    on_rows(h, |h2| h2.apply_op1(Geglu))
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
        // SAFETY: `product` writes each row of `n`, and the rows cover the buffer.
        let mut out = unsafe { uninit(rows * n) };
        product(h, n, &mut out);
        Ok((CpuStorage::F32(out), Shape::from((rows, n))))
    }

    fn bwd(&self, h: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        product_grad(h, dy)
    }
}

/// The rows of `h (rows, 2 n)` -> their products into `out (rows, n)`.
fn product(h: &[f32], n: usize, out: &mut [f32]) {
    if n > 0 {
        out.par_chunks_mut(n)
            .zip(h.par_chunks(2 * n))
            .for_each(|(o, row)| gelu_mul(&row[..n], &row[n..], o));
    }
}

/// The gradient of `h (rows, 2 n)` for the product's `dy (rows, n)`, where `h` tracks:
/// `dh = [dy gelu(g), dy a gelu'(g)]`, `gelu'(g) = Phi(g) + g phi(g)`.
fn product_grad(h: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
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

/// `linear(geglu(h), w, b)`: the feed-forward's product and its output projection `w (o, n)`
/// as one op, so that the product (`(4, 4096, 1280)` at SD1.5's first level, batch 4) is never
/// a tensor: it is the thread's scratch, and in training the op keeps `h` alone (the product
/// comes back from it only where `w` trains).
pub fn geglu_linear(h: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let dims = h.dims();
    let (o, n) = w.dims2()?;
    if dims.last() != Some(&(2 * n)) || b.is_some_and(|b| b.dims() != [o]) {
        candle_core::bail!(
            "geglu_linear: input {dims:?}, weight {:?}, bias {:?}",
            w.dims(),
            b.map(|b| b.dims())
        );
    }
    on_rows(h, |h2| {
        super::apply_biased(h2, &w.contiguous()?, b, GegluLinear)
    })
}

struct GegluLinear;

impl BiasedOp for GegluLinear {
    fn name(&self) -> &'static str {
        "cpu-geglu-linear"
    }

    fn fwd(
        &self,
        (s1, l1): (&CpuStorage, &Layout),
        (s2, l2): (&CpuStorage, &Layout),
        b: Option<&[f32]>,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, _) = l1.shape().dims2()?;
        let (o, n) = l2.shape().dims2()?;
        let (h, w) = (f32_slice(s1, l1)?, f32_slice(s2, l2)?);
        let y = with_scratch(rows * n, |p| {
            product(h, n, p);
            Linear::run(p, w, b, (rows, n, o))
        });
        Ok((CpuStorage::F32(y), Shape::from((rows, o))))
    }

    fn input_grad(&self, h: &Tensor, w: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let dp = Linear.input_grad(h, w, grad)?;
        // `grads` asks for it only where h tracks.
        product_grad(h, &dp)?
            .ok_or_else(|| candle_core::Error::Msg("geglu_linear: h does not track".into()))
    }

    fn weight_grad(&self, h: &Tensor, w: &Tensor, grad: &Tensor) -> Result<Tensor> {
        Linear.weight_grad(&geglu(&h.detach())?, w, grad)
    }

    fn bias_grad(&self, grad: &Tensor) -> Result<Tensor> {
        Linear.bias_grad(grad)
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

    /// The fused projection against the product then [`super::super::linear::linear`]: the
    /// same arithmetic, so values to 1e-6 of their largest; the gradients of `h`, the weight
    /// and the bias to 1e-5 of theirs (grad_err), with a frozen weight getting none. Without a
    /// bias, and a weight that does not fit is an error naming the shapes.
    #[test]
    fn the_fused_projection_is_the_product_then_the_linear() {
        use crate::sd::cpu::linear::linear;
        use crate::sd::cpu::test_util::max_abs;
        for frozen in [false, true] {
            let h = candle_core::Var::from_tensor(&randn(3, &[2, 5, 34])).unwrap();
            let w = candle_core::Var::from_tensor(&randn(4, &[6, 17])).unwrap();
            let w = match frozen {
                true => w.as_tensor().detach(),
                false => w.as_tensor().clone(),
            };
            let b = candle_core::Var::from_tensor(&randn(5, &[6])).unwrap();
            let ours = geglu_linear(&h, &w, Some(&b)).unwrap();
            let theirs = linear(&geglu(&h).unwrap(), &w, Some(&b)).unwrap();
            assert_eq!(ours.dims(), &[2, 5, 6]);
            let err = max_diff(&ours, &theirs) / max_abs(&theirs);
            assert!(err < 1e-6, "frozen {frozen}: {err}");
            let up = randn(6, &[2, 5, 6]);
            let loss = |y: Tensor| (y * &up).unwrap().sum_all().unwrap();
            let (g_ours, g_theirs) = (
                loss(ours).backward().unwrap(),
                loss(theirs).backward().unwrap(),
            );
            for v in [h.as_tensor(), b.as_tensor()] {
                let err = grad_err(&g_ours, &g_theirs, v);
                assert!(err < 1e-5, "frozen {frozen}: {err}");
            }
            match frozen {
                true => assert!(g_ours.get(&w).is_none(), "a frozen weight's gradient"),
                false => {
                    let err = grad_err(&g_ours, &g_theirs, &w);
                    assert!(err < 1e-5, "weight: {err}");
                }
            }
        }
        let (h, w) = (randn(7, &[4, 10]), randn(8, &[3, 5]));
        let plain = linear(&geglu(&h).unwrap(), &w, None).unwrap();
        let fused = geglu_linear(&h, &w, None).unwrap();
        assert!(max_diff(&fused, &plain) < 1e-6);
        let e = geglu_linear(&h, &randn(9, &[3, 4]), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("[4, 10]") && e.contains("[3, 4]"), "{e}");
    }
}
