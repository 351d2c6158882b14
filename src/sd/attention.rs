//! Attention layers, and the call object a hook works on.
//!
//! Every attention layer of the UNet owns its weights and is addressed by its weight path
//! (`down_blocks.0.attentions.0.transformer_blocks.0.attn2`). A caller may pass an
//! [`AttentionHook`](super::hook::AttentionHook) with a typed description of the batch rows
//! ([`BatchLayout`](super::hook::BatchLayout)); in each layer the hook wants it gets an
//! [`AttentionCall`] after Q, K and V are computed and before the values are mixed, and can
//! - read the attention probabilities of any row ([`AttentionCall::probs`]),
//! - replace them ([`AttentionCall::set_probs`]) or make a row reuse another row's
//!   ([`AttentionCall::share_probs`]); a row whose probabilities come from elsewhere never has its
//!   own softmax computed,
//! - change the value features before the head split ([`AttentionCall::set_values`]).
//!
//! Without a hook, or in layers the hook does not want, nothing is recorded and nothing is
//! copied: the layer runs its plain path.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::hook::{HookCtx, Projection};
use crate::sd::cpu::attention as cpu_attention;
use crate::sd::fused::{attention as fused_attention, Kernels};
use crate::sd::nn::{linear, linear_no_bias, Linear, LinearInput};

/// Self-attention (`attn1`: keys from the image) or cross-attention (`attn2`: keys from the text).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AttnKind {
    SelfAttention,
    CrossAttention,
}

/// What is fixed about an attention layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerInfo {
    /// The module's weight path, e.g. `up_blocks.1.attentions.0.transformer_blocks.0.attn2`.
    pub path: String,
    pub kind: AttnKind,
    pub heads: usize,
    pub head_dim: usize,
}

impl LayerInfo {
    /// Width of the value space (`to_v` output features) = heads * head_dim.
    pub fn inner_dim(&self) -> usize {
        self.heads * self.head_dim
    }
}

#[derive(Debug, Clone)]
enum ProbSource {
    Own,
    Given(Tensor),
    Row(usize),
}

/// One attention layer's call, open to a hook. Probabilities are `(heads, queries, keys)` per row
/// in f32; values are `(batch, keys, heads * head_dim)`, before the head split. Queries and keys
/// stay in the projections' layout too, split into heads only on the paths that need it.
pub struct AttentionCall {
    /// `(b, n, inner)`.
    q: Tensor,
    /// `(b, m, inner)`.
    k: Tensor,
    v: Tensor,
    heads: usize,
    scale: f64,
    sources: Vec<ProbSource>,
    /// Own probabilities, computed at most once, for the rows listed.
    own: Option<(Vec<usize>, Tensor)>,
}

impl AttentionCall {
    /// `q`: (b, n, inner), `k` and `v`: (b, m, inner).
    fn new(q: Tensor, k: Tensor, v: Tensor, heads: usize) -> Result<Self> {
        let b = q.dim(0)?;
        let head_dim = q.dim(2)? / heads;
        Ok(Self {
            q,
            k,
            v,
            heads,
            scale: 1.0 / (head_dim as f64).sqrt(),
            sources: vec![ProbSource::Own; b],
            own: None,
        })
    }

    pub fn batch(&self) -> usize {
        self.sources.len()
    }

    /// Number of queries (pixels of the feature map).
    pub fn queries(&self) -> usize {
        self.q.dims()[1]
    }

    /// Number of keys (text tokens in cross-attention).
    pub fn keys(&self) -> usize {
        self.k.dims()[1]
    }

    /// The value features `(batch, keys, inner)` as they will be mixed.
    pub fn values(&self) -> &Tensor {
        &self.v
    }

    /// Replaces the value features; the shape must stay the same.
    pub fn set_values(&mut self, v: Tensor) -> Result<()> {
        if v.shape() != self.v.shape() {
            candle_core::bail!(
                "hook values have shape {:?}, expected {:?}",
                v.dims(),
                self.v.dims()
            );
        }
        self.v = v;
        Ok(())
    }

    fn check_row(&self, row: usize) -> Result<()> {
        if row >= self.batch() {
            candle_core::bail!("row {row} is out of the batch of {}", self.batch());
        }
        Ok(())
    }

    /// The probabilities row `row` will use, `(heads, queries, keys)`, f32.
    pub fn probs(&mut self, row: usize) -> Result<Tensor> {
        self.check_row(row)?;
        let mut r = row;
        for _ in 0..=self.batch() {
            match &self.sources[r] {
                ProbSource::Given(p) => return Ok(p.clone()),
                ProbSource::Row(src) => r = *src,
                ProbSource::Own => {
                    self.compute_own()?;
                    let (rows, p) = self.own.as_ref().expect("computed above");
                    let i = rows
                        .iter()
                        .position(|&x| x == r)
                        .expect("own rows computed");
                    return p.get(i);
                }
            }
        }
        candle_core::bail!("rows share probabilities in a cycle (row {row})")
    }

    /// Row `row` uses `probs` `(heads, queries, keys)` instead of its own softmax.
    pub fn set_probs(&mut self, row: usize, probs: Tensor) -> Result<()> {
        self.check_row(row)?;
        let want = [self.heads, self.queries(), self.keys()];
        if probs.dims() != want {
            candle_core::bail!(
                "hook probabilities have shape {:?}, expected {want:?}",
                probs.dims()
            );
        }
        self.sources[row] = ProbSource::Given(probs.to_dtype(DType::F32)?);
        Ok(())
    }

    /// Row `dst` uses the probabilities of row `src` (as `src` ends up with them).
    pub fn share_probs(&mut self, dst: usize, src: usize) -> Result<()> {
        self.check_row(dst)?;
        self.check_row(src)?;
        if dst == src {
            candle_core::bail!("row {dst} cannot share its own probabilities");
        }
        self.sources[dst] = ProbSource::Row(src);
        Ok(())
    }

    /// Softmax(Q K^T * scale) for every row whose source is its own, in one batched call.
    fn compute_own(&mut self) -> Result<()> {
        if self.own.is_some() {
            return Ok(());
        }
        let rows: Vec<usize> = (0..self.batch())
            .filter(|&r| matches!(self.sources[r], ProbSource::Own))
            .collect();
        let (q, k) = (
            split_heads(&self.q, self.heads)?,
            split_heads(&self.k, self.heads)?,
        );
        let (q, k) = if rows.len() == self.batch() {
            (q, k)
        } else {
            let idx = Tensor::new(
                rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
                self.q.device(),
            )?;
            (q.index_select(&idx, 0)?, k.index_select(&idx, 0)?)
        };
        let probs = attention_probs(&q, &k, self.scale)?;
        self.own = Some((rows, probs));
        Ok(())
    }

    /// Mixes the values with the probabilities: `(batch, queries, inner)`, with the fused op
    /// where `kernels` choose it and nobody asked for probabilities.
    fn finish(mut self, kernels: Kernels) -> Result<Tensor> {
        let all_own = self.sources.iter().all(|s| matches!(s, ProbSource::Own));
        // Nobody asked for probabilities: the fused op and the blocked CPU one never
        // materialise them.
        if all_own && self.own.is_none() {
            return unhooked_attention(&self.q, &self.k, &self.v, self.heads, self.scale, kernels);
        }
        let split = |x: &Tensor| split_heads(x, self.heads);
        let v = split(&self.v)?;
        let probs = if all_own {
            self.compute_own()?;
            self.own.take().expect("computed above").1
        } else {
            let dtype = self.v.dtype();
            let per_row = (0..self.batch())
                .map(|r| self.probs(r)?.to_dtype(dtype)?.unsqueeze(0))
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&per_row, 0)?
        };
        let probs = probs.to_dtype(v.dtype())?;
        let out = if cpu_attention::applies_with_grad(&probs, &v, &v) {
            // The same blocks as the blocked attention: looking changes nothing.
            cpu_attention::mix_tensors(&probs, &v)?
        } else {
            probs.matmul(&v)?
        };
        merge_heads(&out)
    }
}

/// `softmax(scale q k^T) v` on the projections' layout, q `(b, n, h*d)`, k and v
/// `(b, m, h*d)` -> `(b, n, h*d)`, as a layer runs it when no hook asks for probabilities: the
/// fused op where `kernels` choose it and it applies, the blocked CPU op in f32 on the CPU
/// (with gradients too: its backward pass recomputes the probabilities by blocks, and the
/// per-head copies live inside the op, not in the graph), else the composite.
pub fn unhooked_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    kernels: Kernels,
) -> Result<Tensor> {
    let split = |x: &Tensor| split_heads(x, heads);
    if kernels.fused() {
        let (q, k, v) = (split(q)?, split(k)?, split(v)?);
        if fused_attention::supports(&q, &k, &v) {
            return merge_heads(&fused_attention::fused_attention(&q, &k, &v, scale)?);
        }
    }
    if cpu_attention::applies_with_grad(q, k, v) {
        return cpu_attention::attention_heads(q, k, v, heads, scale, false);
    }
    merge_heads(&naive_attention(&split(q)?, &split(k)?, &split(v)?, scale)?)
}

/// `op` over q `(b, h, n, d)`, k and v `(b, h, m, d)` as `(b*h, rows, d)` contiguous tensors
/// -> `(b, h, n, d)`: the frame of the attention kernels (fused, blocked CPU); `what` names the
/// kernel in errors. candle records the op for the backward pass where an input tracks
/// gradients (an op without one then fails in the backward pass, never silently).
pub(crate) fn per_head_op(
    what: &str,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    op: impl candle_core::CustomOp3 + Send + Sync + 'static,
) -> candle_core::Result<Tensor> {
    let (b, h, n, d) = q.dims4()?;
    let (kb, kh, m, kd) = k.dims4()?;
    if (kb, kh, kd) != (b, h, d) || v.dims() != k.dims() {
        candle_core::bail!(
            "{what}: q {:?}, k {:?}, v {:?} do not fit",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if m == 0 {
        candle_core::bail!("{what} over zero keys");
    }
    let flat = |t: &Tensor, rows: usize| t.reshape((b * h, rows, d))?.contiguous();
    flat(q, n)?
        .apply_op3(&flat(k, m)?, &flat(v, m)?, op)?
        .reshape((b, h, n, d))
}

/// (b, n, h*d) -> (b, h, n, d)
fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, n, inner) = x.dims3()?;
    x.reshape((b, n, heads, inner / heads))?
        .transpose(1, 2)?
        .contiguous()
}

/// (b, h, n, d) -> (b, n, h*d)
fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, n, d) = x.dims4()?;
    x.transpose(1, 2)?.reshape((b, n, h * d))
}

/// The unfused attention `softmax(scale * q k^T) v`: q `(b, h, n, d)`, k and v `(b, h, m, d)`
/// -> `(b, h, n, d)`, the composite [`unhooked_attention`] falls back to where neither kernel
/// applies.
fn naive_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    attention_probs(q, k, scale)?.to_dtype(v.dtype())?.matmul(v)
}

/// softmax((q * scale) k^T): q (b, h, n, d), k (b, h, m, d) -> (b, h, n, m).
///
/// In f32, or whenever gradients flow, the softmax runs in f32. In f16/bf16 inference the
/// scores stay in the working dtype: candle's fused softmax accumulates in f32 anyway, and the
/// 4096 x 4096 score matrices of SD1.5's self-attention are not copied to f32 and back.
fn attention_probs(q: &Tensor, k: &Tensor, scale: f64) -> Result<Tensor> {
    if cpu_attention::applies(q, k, k) {
        return cpu_attention::probs_tensors(q, k, scale);
    }
    let scores = (q * scale)?.matmul(&k.t()?)?;
    if scores.dtype() == DType::F32 || scores.track_op() {
        crate::sd::nn::softmax_last_dim(&scores.to_dtype(DType::F32)?)
    } else {
        candle_nn::ops::softmax_last_dim(&scores)
    }
}

/// A diffusers `Attention` module as SD's transformer blocks use it: `to_q`, `to_k`, `to_v`
/// without bias, `to_out.0` with bias; and the kernels it runs.
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    info: LayerInfo,
    kernels: Kernels,
}

impl Attention {
    /// `context_dim`: `None` for self-attention, the text width for cross-attention.
    pub fn new(
        vb: VarBuilder,
        query_dim: usize,
        context_dim: Option<usize>,
        heads: usize,
        head_dim: usize,
        kernels: Kernels,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        let kv_dim = context_dim.unwrap_or(query_dim);
        Ok(Self {
            to_q: linear_no_bias(query_dim, inner, vb.pp("to_q"))?,
            to_k: linear_no_bias(kv_dim, inner, vb.pp("to_k"))?,
            to_v: linear_no_bias(kv_dim, inner, vb.pp("to_v"))?,
            to_out: linear(inner, query_dim, vb.pp("to_out").pp(0))?,
            info: LayerInfo {
                path: vb.prefix(),
                kind: if context_dim.is_some() {
                    AttnKind::CrossAttention
                } else {
                    AttnKind::SelfAttention
                },
                heads,
                head_dim,
            },
            kernels,
        })
    }

    pub fn info(&self) -> &LayerInfo {
        &self.info
    }

    /// The kernels it was built with.
    pub fn kernels(&self) -> Kernels {
        self.kernels
    }

    /// A projection's weight `(out, in)` and bias (`to_out.0` has one), as loaded.
    pub fn projection(&self, p: Projection) -> (&Tensor, Option<&Tensor>) {
        let l = match p {
            Projection::Query => &self.to_q,
            Projection::Key => &self.to_k,
            Projection::Value => &self.to_v,
            Projection::Out => &self.to_out,
        };
        (l.weight(), l.bias())
    }

    /// `xs`: (b, h*w, query_dim) with `spatial` = (h, w), usually a layer norm's output on its
    /// way in; `context`: (b, keys, context_dim) for cross-attention.
    pub fn forward(
        &self,
        xs: &LinearInput<'_>,
        context: Option<&Tensor>,
        spatial: (usize, usize),
        hook: Option<&HookCtx<'_>>,
    ) -> Result<Tensor> {
        let context = context.map(LinearInput::plain);
        let kv_in = context.as_ref().unwrap_or(xs);
        let Some(h) = hook.filter(|h| h.hook.wants(&self.info)) else {
            let q = xs.linear(&self.to_q)?;
            let k = kv_in.linear(&self.to_k)?;
            let v = kv_in.linear(&self.to_v)?;
            let call = AttentionCall::new(q, k, v, self.info.heads)?;
            return self.to_out.forward(&call.finish(self.kernels)?);
        };
        let batch = xs.tensor()?.dim(0)?;
        if h.rows.len() != batch {
            candle_core::bail!(
                "{}: the batch layout has {} rows, the batch {batch}",
                self.info.path,
                h.rows.len(),
            );
        }
        let site = super::hook::AttnSite {
            layer: &self.info,
            step: h.step,
            rows: h.rows,
            spatial,
        };
        let project = |p: Projection, layer: &Linear, input: &LinearInput| {
            h.hook
                .project(&site, p, input.tensor()?, input.linear(layer)?)
        };
        let q = project(Projection::Query, &self.to_q, xs)?;
        let k = project(Projection::Key, &self.to_k, kv_in)?;
        let v = project(Projection::Value, &self.to_v, kv_in)?;
        let mut call = AttentionCall::new(q, k, v, self.info.heads)?;
        h.hook.attend(&site, &mut call)?;
        let mixed = call.finish(self.kernels)?;
        project(Projection::Out, &self.to_out, &LinearInput::plain(&mixed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn call(b: usize) -> AttentionCall {
        let r = |seed: u64, n: usize| {
            let t = crate::util::noise::seeded_noise(seed, &[b, n, 8]).unwrap();
            t.to_device(&Device::Cpu).unwrap()
        };
        AttentionCall::new(r(1, 6), r(2, 5), r(3, 5), 2).unwrap()
    }

    #[test]
    fn a_shared_row_gets_no_softmax_of_its_own() {
        let mut c = call(4);
        c.share_probs(3, 1).unwrap();
        let p1 = c.probs(1).unwrap();
        // Only rows 0..3 were computed, in one batched call; row 3 reads row 1's.
        assert_eq!(c.own.as_ref().unwrap().0, vec![0, 1, 2]);
        let p3 = c.probs(3).unwrap();
        let d = (p1 - p3)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0);
    }

    #[test]
    fn replaced_rows_are_checked_and_used() {
        let mut c = call(2);
        let bad = Tensor::zeros((2, 6, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(c.set_probs(0, bad).is_err());
        let uniform = (Tensor::ones((2, 6, 5), DType::F32, &Device::Cpu).unwrap() / 5.0).unwrap();
        c.set_probs(0, uniform.clone()).unwrap();
        assert!(c.share_probs(1, 1).is_err());
        assert!(c.probs(2).is_err());
        let v = c.values().clone();
        let out = c.finish(Kernels::Naive).unwrap();
        // With uniform probabilities every query of row 0 gets the mean of the values.
        let mean = v.get(0).unwrap().mean_keepdim(0).unwrap();
        let row0 = out.get(0).unwrap().get(3).unwrap().unsqueeze(0).unwrap();
        let d = (row0 - mean)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-6, "{d}");
    }
}
