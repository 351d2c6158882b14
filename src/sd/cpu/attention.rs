//! `softmax(scale q k^T) v` on the CPU in f32, by blocks of query rows: per block, the scores
//! against every key are one GEMM (at most `BLOCK_ELEMS` of them, in the thread's scratch
//! space), the softmax runs over them in cache, and one GEMM with V writes the block's output.
//! `(batch x head)` slices and their blocks run in parallel; the `(n, m)` score matrix never
//! exists whole. Where a hook asks for the probabilities, [`probs`] and [`mix`] do the same
//! two halves with the same blocks, so a run that looks at them changes no bit of the result.
//!
//! Training goes through the same op: its backward ([`attention_grads`]) recomputes each
//! block's probabilities instead of keeping them, so a self-attention layer holds q, k and v
//! for the backward pass, not its `(n, m)` probabilities (2 GiB per layer at SD1.5's first
//! level, batch 4).

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{sgemm, transpose, uninit, with_scratch, Mat};

/// Scores per block (1 MiB): 64 query rows against SD1.5's 4096 keys.
const BLOCK_ELEMS: usize = 1 << 18;

/// Query rows per block for `m` keys (one partition for [`attention`], [`probs`] and [`mix`],
/// so that their GEMMs see the same blocks).
fn block_rows(n: usize, m: usize) -> usize {
    (BLOCK_ELEMS / m.max(1)).clamp(1, n.max(1))
}

/// A block's scores or probabilities are kept key-major: `pt (m, r)`, key `j`'s row holding
/// its value for each of the block's `r` queries. Both GEMMs then run gemm's widest kernel
/// along the queries and read their operands unpacked (query-major, the mix's output had
/// `d` = 40 rows in gemm's kernel direction and both operands were repacked per block:
/// ~41 G multiply-adds/s on one core here, ~55 key-major, of a 58.6 peak).
///
/// `pt = qb ks^T` for qb `(r, d)` and ks `(m, d)`, row-major.
fn scores(qb: &[f32], ks: &[f32], pt: &mut [f32], (r, m, d): (usize, usize, usize)) {
    // SAFETY: qb (r, d) row-major; ks (m, d) read as ks^T (d, m); pt (m, r) row-major, the
    // (r, m) result's transpose.
    unsafe {
        sgemm(
            (r, m, d),
            Mat::cols(pt.as_mut_ptr(), r),
            Mat::rows(qb.as_ptr(), d),
            Mat::cols(ks.as_ptr(), d),
            false,
            1,
        )
    };
}

/// One block's probabilities, key-major: `pt (m, r)` = the transpose of
/// `softmax(scale qb ks^T)` (the softmax over each query's column). `causal`: the block's
/// first query row, whose query `i` sees keys `0..=first + i` only (a causal mask: CLIP's text
/// encoder).
fn block_probs(
    qb: &[f32],
    ks: &[f32],
    pt: &mut [f32],
    (r, m, d): (usize, usize, usize),
    scale: f32,
    causal: Option<usize>,
) {
    scores(qb, ks, pt, (r, m, d));
    if let Some(first) = causal {
        for (j, row) in pt.chunks_exact_mut(r).enumerate().skip(first + 1) {
            row[..(j - first).min(r)].fill(f32::NEG_INFINITY);
        }
    }
    super::exp::softmax_columns(pt, r, scale);
}

/// One block's output: `o (r, d) = p vs` for key-major probabilities `pt (m, r)` and
/// `vs (m, d)`, through `ot (d, r)` (gemm's widest kernel runs along the queries).
fn block_mix(pt: &[f32], vs: &[f32], o: &mut [f32], (r, m, d): (usize, usize, usize)) {
    // SAFETY: the GEMM below writes every element.
    let mut ot = unsafe { uninit(d * r) };
    // SAFETY: pt (m, r) row-major read as p (r, m); vs (m, d) row-major; ot (d, r) row-major
    // holds the (r, d) result's transpose.
    unsafe {
        sgemm(
            (r, d, m),
            Mat::cols(ot.as_mut_ptr(), r),
            Mat::cols(pt.as_ptr(), r),
            Mat::rows(vs.as_ptr(), d),
            false,
            1,
        )
    };
    transpose(&ot, (d, r), r, o, d, false);
}

/// Runs `f(slice, first_row, rows, out_block)` over the blocks of query rows of every
/// `(batch x head)` slice of `out` (`n` rows of `width` per slice), in parallel.
fn by_blocks(
    out: &mut [f32],
    (n, width, rows): (usize, usize, usize),
    f: impl Fn(usize, usize, usize, &mut [f32]) + Sync,
) {
    if n == 0 || width == 0 {
        return;
    }
    out.par_chunks_mut(n * width)
        .enumerate()
        .for_each(|(s, slice)| {
            slice
                .par_chunks_mut(rows * width)
                .enumerate()
                .for_each(|(blk, o)| f(s, blk * rows, o.len() / width, o));
        });
}

/// q `(bh, n, d)`, k and v `(bh, m, d)`, all contiguous -> `(bh, n, d)`; `causal`: query `i`
/// sees keys `0..=i` only.
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    (bh, n, m, d): (usize, usize, usize, usize),
    scale: f32,
    causal: bool,
) -> Vec<f32> {
    // SAFETY: `by_blocks` hands every row block to `block_mix`, which writes it whole.
    let mut out = unsafe { uninit(bh * n * d) };
    by_blocks(&mut out, (n, d, block_rows(n, m)), |s, row, r, o| {
        let (ks, vs) = (&k[s * m * d..][..m * d], &v[s * m * d..][..m * d]);
        let qb = &q[(s * n + row) * d..][..r * d];
        with_scratch(m * r, |pt| {
            block_probs(qb, ks, pt, (r, m, d), scale, causal.then_some(row));
            block_mix(pt, vs, o, (r, m, d));
        });
    });
    out
}

/// The gradients of [`attention`] for the output's gradient `go (bh, n, d)`: `(dq, dk, dv)`.
/// Per block of query rows, with `p` its probabilities (recomputed) and `dp = go v^T`:
/// `ds = scale p (dp - rowsum(p dp))`, `dq = ds k`, `dk += ds^T q`, `dv += p^T go`. Slices run
/// in parallel, the blocks of one slice in turn (they add into the same `dk`, `dv`). Every
/// `(r, m)` block is key-major, as in the forward pass.
pub fn attention_grads(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    go: &[f32],
    (bh, n, m, d): (usize, usize, usize, usize),
    scale: f32,
    causal: bool,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (mut dq, mut dk, mut dv) = (
        vec![0.0; bh * n * d],
        vec![0.0; bh * m * d],
        vec![0.0; bh * m * d],
    );
    if bh * n * m * d == 0 {
        return (dq, dk, dv);
    }
    let rows = block_rows(n, m);
    dq.par_chunks_mut(n * d)
        .zip(dk.par_chunks_mut(m * d))
        .zip(dv.par_chunks_mut(m * d))
        .enumerate()
        .for_each(|(s, ((dq, dk), dv))| {
            let (ks, vs) = (&k[s * m * d..][..m * d], &v[s * m * d..][..m * d]);
            with_scratch(2 * rows * m, |scratch| {
                for row in (0..n).step_by(rows) {
                    let r = rows.min(n - row);
                    let (p, dp) = scratch.split_at_mut(rows * m);
                    let (p, dp) = (&mut p[..r * m], &mut dp[..r * m]);
                    let at = (s * n + row) * d;
                    let (qb, gb) = (&q[at..][..r * d], &go[at..][..r * d]);
                    block_probs(qb, ks, p, (r, m, d), scale, causal.then_some(row));
                    scores(gb, vs, dp, (r, m, d));
                    super::exp::softmax_grad_columns(dp, p, r, scale);
                    block_grads(
                        p,
                        dp,
                        (qb, gb, ks),
                        (&mut dq[row * d..][..r * d], dk, dv),
                        (r, m, d),
                    );
                }
            });
        });
    (dq, dk, dv)
}

/// A block's share of the three gradients, for key-major `pt` and `dst (m, r)`:
/// `dqb = ds ks`, `dk += ds^T qb`, `dv += p^T gb`.
fn block_grads(
    pt: &[f32],
    dst: &[f32],
    (qb, gb, ks): (&[f32], &[f32], &[f32]),
    (dqb, dk, dv): (&mut [f32], &mut [f32], &mut [f32]),
    (r, m, d): (usize, usize, usize),
) {
    // SAFETY: dst and pt (m, r) row-major, read as-is or transposed (r, m); ks (m, d), qb and
    // gb (r, d), dqb (r, d), dk and dv (m, d), all row-major.
    unsafe {
        sgemm(
            (r, d, m),
            Mat::rows(dqb.as_mut_ptr(), d),
            Mat::cols(dst.as_ptr(), r),
            Mat::rows(ks.as_ptr(), d),
            false,
            1,
        );
        sgemm(
            (m, d, r),
            Mat::rows(dk.as_mut_ptr(), d),
            Mat::rows(dst.as_ptr(), r),
            Mat::rows(qb.as_ptr(), d),
            true,
            1,
        );
        sgemm(
            (m, d, r),
            Mat::rows(dv.as_mut_ptr(), d),
            Mat::rows(pt.as_ptr(), r),
            Mat::rows(gb.as_ptr(), d),
            true,
            1,
        );
    }
}

/// The probabilities alone: q `(bh, n, d)`, k `(bh, m, d)` -> `(bh, n, m)`, the same blocks
/// and arithmetic as [`attention`].
pub fn probs(
    q: &[f32],
    k: &[f32],
    (bh, n, m, d): (usize, usize, usize, usize),
    scale: f32,
) -> Vec<f32> {
    // SAFETY: `by_blocks` hands every row block to `transpose`, which writes it whole.
    let mut out = unsafe { uninit(bh * n * m) };
    by_blocks(&mut out, (n, m, block_rows(n, m)), |s, row, r, p| {
        let qb = &q[(s * n + row) * d..][..r * d];
        with_scratch(m * r, |pt| {
            block_probs(qb, &k[s * m * d..][..m * d], pt, (r, m, d), scale, None);
            transpose(pt, (m, r), r, p, m, false);
        });
    });
    out
}

/// Probabilities applied to values: p `(bh, n, m)`, v `(bh, m, d)` -> `(bh, n, d)`, the same
/// blocks as [`attention`] (so that probabilities from [`probs`] give its output bit for bit).
pub fn mix(p: &[f32], v: &[f32], (bh, n, m, d): (usize, usize, usize, usize)) -> Vec<f32> {
    // SAFETY: `by_blocks` hands every row block to `block_mix`, which writes it whole.
    let mut out = unsafe { uninit(bh * n * d) };
    by_blocks(&mut out, (n, d, block_rows(n, m)), |s, row, r, o| {
        let pb = &p[(s * n + row) * m..][..r * m];
        with_scratch(m * r, |pt| {
            transpose(pb, (r, m), m, pt, r, false);
            block_mix(pt, &v[s * m * d..][..m * d], o, (r, m, d));
        });
    });
    out
}

/// Whether [`probs_tensors`] takes these: f32 on the CPU, nothing tracking gradients (it has
/// no backward pass). [`mix_tensors`] takes what [`applies_with_grad`] does.
pub fn applies(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    applies_with_grad(q, k, v) && ![q, k, v].iter().any(|t| t.track_op())
}

/// Whether [`attention_heads`] and [`mix_tensors`] take these: f32 on the CPU, gradients or
/// not.
pub fn applies_with_grad(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    [q, k, v].iter().all(|t| super::cpu_f32(t))
}

/// [`attention`] on the projections' layout: q `(b, n, h*d)`, k and v `(b, m, h*d)` ->
/// `(b, n, h*d)`; differentiable ([`attention_grads`]) when any of them tracks gradients. The
/// heads are split into (and the output merged from) buffers inside the op, so that training
/// keeps q, k and v as the projections wrote them and no per-head copies (4 activation-sized
/// tensors per layer: 1.1 GiB over SD1.5's UNet at batch 4).
pub fn attention_heads(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    causal: bool,
) -> Result<Tensor> {
    let (b, _, inner) = q.dims3()?;
    let (kb, m, k_inner) = k.dims3()?;
    if heads == 0 || inner % heads != 0 || (kb, k_inner) != (b, inner) || v.dims() != k.dims() {
        candle_core::bail!(
            "attention: q {:?}, k {:?}, v {:?} do not fit {heads} heads",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if m == 0 {
        candle_core::bail!("attention over zero keys");
    }
    if causal && m != q.dim(1)? {
        candle_core::bail!("causal attention of {} queries over {m} keys", q.dim(1)?);
    }
    let op = Heads {
        heads,
        scale: scale as f32,
        causal,
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

/// [`attention_heads`]' op.
struct Heads {
    heads: usize,
    scale: f32,
    causal: bool,
}

impl Heads {
    /// `(b, rows, h*d)` -> `(b*h, rows, d)`.
    fn split(&self, x: &[f32], (b, rows, inner): (usize, usize, usize)) -> Vec<f32> {
        let d = inner / self.heads;
        // SAFETY: each (batch, head) chunk of rows*d is written whole, row by row.
        let mut out = unsafe { uninit(b * rows * inner) };
        if d > 0 && rows > 0 {
            out.par_chunks_mut(rows * d).enumerate().for_each(|(s, o)| {
                let (i, j) = (s / self.heads, s % self.heads);
                for (r, dst) in o.chunks_exact_mut(d).enumerate() {
                    dst.copy_from_slice(&x[(i * rows + r) * inner + j * d..][..d]);
                }
            });
        }
        out
    }

    /// `(b*h, rows, d)` -> `(b, rows, h*d)`.
    fn merge(&self, x: &[f32], (b, rows, inner): (usize, usize, usize)) -> Vec<f32> {
        let d = inner / self.heads;
        // SAFETY: each batch's rows*inner is written whole, one head's d at a time.
        let mut out = unsafe { uninit(b * rows * inner) };
        if d > 0 && rows > 0 {
            out.par_chunks_mut(rows * inner)
                .enumerate()
                .for_each(|(i, o)| {
                    for (r, row) in o.chunks_exact_mut(inner).enumerate() {
                        for (j, dst) in row.chunks_exact_mut(d).enumerate() {
                            dst.copy_from_slice(&x[((i * self.heads + j) * rows + r) * d..][..d]);
                        }
                    }
                });
        }
        out
    }
}

/// [`probs`] on tensors: q `(b, h, n, d)`, k `(b, h, m, d)` -> `(b, h, n, m)`.
pub fn probs_tensors(q: &Tensor, k: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, h, n, d) = q.dims4()?;
    let m = k.dim(2)?;
    let flat = |t: &Tensor, rows: usize| t.reshape((b * h, rows, d))?.contiguous();
    let p = flat(q, n)?.apply_op2_no_bwd(
        &flat(k, m)?,
        &Half {
            scale: Some(scale as f32),
        },
    )?;
    p.reshape((b, h, n, m))
}

/// [`mix`] on tensors: p `(b, h, n, m)`, v `(b, h, m, d)` -> `(b, h, n, d)`; differentiable,
/// with a gradient only for what tracks: given probabilities (Infusion's C takes F's) get none,
/// where candle's matmul computed and kept one per layer (0.26 GiB over SD1.5's cross-attention
/// layers at batch 4).
pub fn mix_tensors(p: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (b, h, n, m) = p.dims4()?;
    let d = v.dim(3)?;
    let out = p.reshape((b * h, n, m))?.contiguous()?.apply_op2(
        &v.reshape((b * h, m, d))?.contiguous()?,
        Half { scale: None },
    )?;
    out.reshape((b, h, n, d))
}

/// One half of the blocked attention: the probabilities (with the scale) or the mix.
struct Half {
    scale: Option<f32>,
}

impl CustomOp2 for Half {
    fn name(&self) -> &'static str {
        "blocked-attention-half"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (a, b) = (super::f32_slice(s1, l1)?, super::f32_slice(s2, l2)?);
        let (bh, n, x) = l1.shape().dims3()?;
        let (_, y, z) = l2.shape().dims3()?;
        Ok(match self.scale {
            // q (bh, n, d), k (bh, m, d).
            Some(scale) => (
                CpuStorage::F32(probs(a, b, (bh, n, y, x), scale)),
                Shape::from((bh, n, y)),
            ),
            // p (bh, n, m), v (bh, m, d).
            None => (
                CpuStorage::F32(mix(a, b, (bh, n, x, z))),
                Shape::from((bh, n, z)),
            ),
        })
    }

    /// The mix's: `dp = go v^T`, `dv = p^T go`, each where its argument tracks. The
    /// probabilities are only ever computed without gradients (`apply_op2_no_bwd`).
    fn bwd(
        &self,
        p: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if self.scale.is_some() {
            candle_core::bail!("the blocked probabilities have no backward pass");
        }
        let dp = p.track_op().then(|| grad.matmul(&v.t()?)).transpose()?;
        let dv = v.track_op().then(|| p.t()?.matmul(grad)).transpose()?;
        Ok((dp, dv))
    }
}

impl CustomOp3 for Heads {
    fn name(&self) -> &'static str {
        "blocked-attention"
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
        let (b, n, inner) = l1.shape().dims3()?;
        let m = l2.shape().dims3()?.1;
        let split = |s, l, rows| {
            Ok::<_, candle_core::Error>(self.split(super::f32_slice(s, l)?, (b, rows, inner)))
        };
        let (q, k, v) = (split(s1, l1, n)?, split(s2, l2, m)?, split(s3, l3, m)?);
        let dims = (b * self.heads, n, m, inner / self.heads);
        let out = attention(&q, &k, &v, dims, self.scale, self.causal);
        let out = self.merge(&out, (b, n, inner));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, n, inner) = q.dims3()?;
        let m = k.dim(1)?;
        let split = |t: &Tensor, rows| {
            Ok::<_, candle_core::Error>(self.split(&super::f32_data(t)?, (b, rows, inner)))
        };
        let dims = (b * self.heads, n, m, inner / self.heads);
        let (dq, dk, dv) = attention_grads(
            &split(q, n)?,
            &split(k, m)?,
            &split(v, m)?,
            &split(grad, n)?,
            dims,
            self.scale,
            self.causal,
        );
        let grad = |t: &Tensor, g: Vec<f32>, rows| match t.track_op() {
            true => super::grad_for(t, self.merge(&g, (b, rows, inner))),
            false => Ok(None),
        };
        Ok((grad(q, dq, n)?, grad(k, dk, m)?, grad(v, dv, m)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sd::cpu::test_util::{grad_err, max_diff, randn};

    /// `(b, h, n, d)` -> `(b, n, h*d)`: the projections' layout, which the op takes.
    fn merged(x: &Tensor) -> Tensor {
        let (b, h, n, d) = x.dims4().unwrap();
        x.transpose(1, 2).unwrap().reshape((b, n, h * d)).unwrap()
    }

    /// On the projections' layout, against candle's composite `softmax(scale q k^T) v` (the
    /// heads split, matmul, softmax, matmul, merged) to f32
    /// rounding (2e-5 of the inputs' size; scores of size 30 carry ~1e-5 relative rounding into the softmax): one row, blocks that do not divide the
    /// rows, SD1.5's head sizes, cross-attention's 77 keys, and scores with a standard deviation of 9;
    /// with a causal mask where queries and keys are as many (CLIP's text encoder, and 1100
    /// rows in five blocks of 238 that each start the mask at their own row).
    #[test]
    fn matches_the_composite_attention() {
        for (i, &(b, h, n, m, d, amp)) in [
            (1, 1, 1, 1, 8, 1.0),
            (2, 3, 65, 77, 40, 1.0),
            (1, 2, 300, 1000, 80, 1.0),
            (1, 1, 130, 33, 160, 3.0),
            (2, 12, 77, 77, 64, 1.0),
            (1, 1, 1100, 1100, 8, 1.0),
        ]
        .iter()
        .enumerate()
        {
            let r =
                |s: u64, rows: usize| (randn(10 * i as u64 + s, &[b, h, rows, d]) * amp).unwrap();
            let (q, k, v) = (r(0, n), r(1, m), r(2, m));
            let scale = 1.0 / (d as f64).sqrt();
            for causal in [false, true].into_iter().filter(|&c| !c || n == m) {
                let ours = attention_heads(&merged(&q), &merged(&k), &merged(&v), h, scale, causal)
                    .unwrap();
                let scores = (&q * scale).unwrap().matmul(&k.t().unwrap()).unwrap();
                let scores = match causal {
                    true => scores.broadcast_add(&causal_mask(n)).unwrap(),
                    false => scores,
                };
                let p = candle_nn::ops::softmax_last_dim(&scores).unwrap();
                let theirs = merged(&p.matmul(&v).unwrap());
                let err = max_diff(&ours, &theirs);
                assert!(err < 2e-5 * amp as f32, "case {i}, causal {causal}: {err}");
            }
        }
        let q = randn(1, &[1, 4, 8]);
        let e = attention_heads(&q, &q, &q, 3, 1.0, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("3 heads") && e.contains("[1, 4, 8]"), "{e}");
        let k = randn(1, &[1, 5, 8]);
        let e = attention_heads(&q, &k, &k, 2, 1.0, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("causal"), "{e}");
    }

    /// CLIP's causal mask, as the text encoder's composite path adds it.
    fn causal_mask(n: usize) -> Tensor {
        crate::sd::text_encoder::causal_mask(n, candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap()
    }

    /// The backward pass against candle's composite (matmul, softmax, matmul) differentiated
    /// by candle, for the loss `sum(out * up)`: dq, dk and dv to 5e-5 of the largest gradient
    /// (f32 sums over up to 1000 keys). Cases: one row; 77 keys; 1000 keys, so that 300 query
    /// rows run as two blocks of 262 and 38 that add into the same dk, dv; 600 rows in two
    /// blocks, with and without a causal mask.
    #[test]
    fn gradients_match_the_composite() {
        use candle_core::Var;
        for (i, &(b, h, n, m, d)) in [
            (1, 1, 1, 1, 8),
            (2, 3, 65, 77, 40),
            (1, 2, 300, 1000, 16),
            (1, 2, 600, 600, 16),
        ]
        .iter()
        .enumerate()
        {
            let r = |s: u64, rows: usize| {
                Var::from_tensor(&randn(10 * i as u64 + s, &[b, rows, h * d])).unwrap()
            };
            let (q, k, v) = (r(0, n), r(1, m), r(2, m));
            let up = randn(10 * i as u64 + 3, &[b, n, h * d]);
            let scale = 1.0 / (d as f64).sqrt();
            let loss = |out: Tensor| (out * &up).unwrap().sum_all().unwrap();
            let split = |x: &Var, rows| {
                let x = x.reshape((b, rows, h, d)).unwrap().transpose(1, 2).unwrap();
                x.contiguous().unwrap()
            };
            for causal in [false, true].into_iter().filter(|&c| !c || n == m) {
                let ours = loss(attention_heads(&q, &k, &v, h, scale, causal).unwrap())
                    .backward()
                    .unwrap();
                let scores = ((split(&q, n) * scale).unwrap())
                    .matmul(&split(&k, m).t().unwrap())
                    .unwrap();
                let scores = match causal {
                    true => scores.broadcast_add(&causal_mask(n)).unwrap(),
                    false => scores,
                };
                let p = candle_nn::ops::softmax(&scores, candle_core::D::Minus1).unwrap();
                let theirs = loss(merged(&p.matmul(&split(&v, m)).unwrap()))
                    .backward()
                    .unwrap();
                for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
                    let err = grad_err(&ours, &theirs, x);
                    assert!(err < 5e-5, "case {i}, causal {causal}, d{name}: {err}");
                }
            }
        }
    }

    /// The mix with gradients against candle's matmul differentiated by candle, to 1e-5 of the
    /// largest gradient: given probabilities (frozen) get no gradient and the values theirs;
    /// probabilities that track get theirs too.
    #[test]
    fn the_mix_differentiates_what_tracks() {
        use candle_core::Var;
        let (b, h, n, m, d) = (2, 3, 70, 77, 8);
        let p = candle_nn::ops::softmax_last_dim(&randn(1, &[b, h, n, m])).unwrap();
        let v = Var::from_tensor(&randn(2, &[b, h, m, d])).unwrap();
        let up = randn(3, &[b, h, n, d]);
        let loss = |out: Tensor| (out * &up).unwrap().sum_all().unwrap();
        for tracked in [false, true] {
            let p = match tracked {
                true => Var::from_tensor(&p).unwrap().as_tensor().clone(),
                false => p.clone(),
            };
            let ours = loss(mix_tensors(&p, &v).unwrap()).backward().unwrap();
            let theirs = loss(p.matmul(&v).unwrap()).backward().unwrap();
            let err = grad_err(&ours, &theirs, &v);
            assert!(err < 1e-5, "dv, p tracked {tracked}: {err}");
            match tracked {
                false => assert!(ours.get(&p).is_none(), "given probabilities' gradient"),
                true => {
                    let err = grad_err(&ours, &theirs, &p);
                    assert!(err < 1e-5, "dp: {err}");
                }
            }
        }
    }
}
