//! The one implementation of what Infusion changes in the UNet.
//!
//! In every cross-attention layer, each conditional row of C (the customized pipeline)
//! - uses F's attention probabilities of the same layer, step and sample (the "where" path; its
//!   own softmax is never computed), and
//! - adds each concept's Δ of that layer to the value features at the token positions of the
//!   concept's word (the "what" path): `v'_obj = v_obj + Δ_l`.
//!
//! Unconditional rows, F's rows and self-attention are untouched. Generation runs F and C in one
//! batched UNet call (C's rows share F's rows); training and the Fisher divergence run F first,
//! without gradient, and replay its recorded maps in C ([`eps_pair`]). Both go through
//! [`InfusionHook`], so they cannot drift apart.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};

use super::maps::AttentionMaps;
use super::Stream;
use crate::error::{Error, Result};
use crate::sd::attention::{AttentionCall, AttnKind, LayerInfo};
use crate::sd::hook::{AttentionHook, AttnSite, BatchLayout, Guidance, HookCtx};
use crate::sd::pipeline::StableDiffusion;

/// What C adds in one of its samples: for each concept placed in that sample's prompt, the token
/// positions of its word and its Δ per layer path (a `Var`'s tensor when training).
pub type SampleEdit<'a> = Vec<(&'a [usize], &'a BTreeMap<String, Tensor>)>;

/// Per cross-attention layer, what each of C's samples adds to its values: `(samples, keys,
/// inner)`. Built with tensor operations, so gradients reach the Δs.
#[derive(Debug, Clone, Default)]
pub struct ValueOffsets(HashMap<String, Tensor>);

impl ValueOffsets {
    /// The offsets of `edits` (one per C sample) for the cross-attention layers among `layers`,
    /// over `keys` text tokens, on `device` in `dtype`. Every Δ must exist for every layer with
    /// the layer's width.
    pub fn new(
        edits: &[SampleEdit<'_>],
        layers: &[&LayerInfo],
        keys: usize,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let n = edits.len();
        // One one-hot mask over (sample, position) per distinct Δ map: offsets = Σ mask x Δ.
        let mut groups: Vec<(&BTreeMap<String, Tensor>, Vec<f32>)> = vec![];
        for (s, edit) in edits.iter().enumerate() {
            for &(positions, deltas) in edit {
                let i = match groups.iter().position(|(d, _)| std::ptr::eq(*d, deltas)) {
                    Some(i) => i,
                    None => {
                        groups.push((deltas, vec![0f32; n * keys]));
                        groups.len() - 1
                    }
                };
                for &k in positions {
                    if k >= keys {
                        return Err(Error::arg(
                            "positions",
                            format!("position {k} is past {keys} tokens"),
                        ));
                    }
                    groups[i].1[s * keys + k] = 1.0;
                }
            }
        }
        let masks = groups
            .into_iter()
            .map(|(deltas, mask)| Ok((deltas, Tensor::from_vec(mask, (n, keys, 1), device)?)))
            .collect::<Result<Vec<_>>>()?;
        let mut out = HashMap::new();
        for layer in layers.iter().filter(|l| l.kind == AttnKind::CrossAttention) {
            let inner = layer.inner_dim();
            let mut sum: Option<Tensor> = None;
            for (deltas, mask) in &masks {
                let d = deltas.get(&layer.path).ok_or_else(|| {
                    Error::arg("concept", format!("no Δ for layer `{}`", layer.path))
                })?;
                if d.elem_count() != inner {
                    return Err(Error::arg(
                        "concept",
                        format!(
                            "the Δ of `{}` has {} values, the layer has {inner}",
                            layer.path,
                            d.elem_count()
                        ),
                    ));
                }
                let d = d
                    .to_device(device)?
                    .to_dtype(DType::F32)?
                    .reshape((1, 1, inner))?;
                let term = mask.broadcast_mul(&d)?;
                sum = Some(match sum {
                    Some(prev) => (prev + term)?,
                    None => term,
                });
            }
            if let Some(sum) = sum {
                out.insert(layer.path.clone(), sum.to_dtype(dtype)?);
            }
        }
        Ok(Self(out))
    }

    fn get(&self, layer: &str) -> Option<&Tensor> {
        self.0.get(layer)
    }
}

/// Where C's rows take F's attention probabilities from.
#[derive(Debug, Clone, Copy)]
pub enum FMaps<'a> {
    /// F's conditional rows are in the same batch: C's rows share them.
    InBatch,
    /// F ran before on the same inputs: its probabilities per layer path, `(samples, heads,
    /// queries, keys)`.
    Recorded(&'a HashMap<String, Tensor>),
}

/// Infusion's attention hook (see the module documentation).
pub struct InfusionHook<'a> {
    offsets: ValueOffsets,
    f_maps: FMaps<'a>,
    /// Steps with an index below this use F's maps in C; `None`: every call (calls without a
    /// step, as in training, always do).
    replace_until: Option<usize>,
    capture: Option<&'a AttentionMaps>,
}

impl<'a> InfusionHook<'a> {
    pub fn new(offsets: ValueOffsets, f_maps: FMaps<'a>) -> Self {
        Self {
            offsets,
            f_maps,
            replace_until: None,
            capture: None,
        }
    }

    /// C uses F's maps only in the steps with an index below `step` (its own afterwards).
    pub fn replace_until(mut self, step: usize) -> Self {
        self.replace_until = Some(step);
        self
    }

    /// Records the conditional maps of both pipelines into `maps`.
    pub fn capture(mut self, maps: Option<&'a AttentionMaps>) -> Self {
        self.capture = maps;
        self
    }

    /// C's probabilities of `row` (sample `sample`) come from F.
    fn use_f_maps(
        &self,
        site: &AttnSite<'_>,
        call: &mut AttentionCall,
        row: usize,
        sample: usize,
    ) -> candle_core::Result<()> {
        let missing = || {
            candle_core::Error::Msg(format!(
                "{}: no maps of F for C's sample {sample}",
                site.layer.path
            ))
        };
        match self.f_maps {
            FMaps::InBatch => {
                let f = site
                    .rows
                    .find(Stream::Foundational.branch(), Guidance::Conditional, sample)
                    .ok_or_else(missing)?;
                call.share_probs(row, f)
            }
            FMaps::Recorded(maps) => {
                let m = maps.get(&site.layer.path).ok_or_else(missing)?;
                call.set_probs(row, m.get(sample)?)
            }
        }
    }

    /// `(batch, keys, inner)`: C's conditional rows get their sample's offsets, other rows 0.
    fn batch_offsets(
        offsets: &Tensor,
        rows: &BatchLayout,
        c_rows: &[(usize, usize)],
    ) -> candle_core::Result<Tensor> {
        let (_, keys, inner) = offsets.dims3()?;
        let zero = Tensor::zeros((1, keys, inner), offsets.dtype(), offsets.device())?;
        let table = Tensor::cat(&[&zero, offsets], 0)?;
        let idx: Vec<u32> = (0..rows.len())
            .map(|r| {
                c_rows
                    .iter()
                    .find(|&&(row, _)| row == r)
                    .map_or(0, |&(_, s)| s as u32 + 1)
            })
            .collect();
        table.index_select(&Tensor::new(idx, offsets.device())?, 0)
    }
}

impl AttentionHook for InfusionHook<'_> {
    fn wants(&self, layer: &LayerInfo) -> bool {
        layer.kind == AttnKind::CrossAttention
    }

    fn attend(&self, site: &AttnSite<'_>, call: &mut AttentionCall) -> candle_core::Result<()> {
        let replace = match (site.step, self.replace_until) {
            (Some(step), Some(until)) => step.index < until,
            _ => true,
        };
        let c_rows: Vec<(usize, usize)> = site
            .rows
            .rows()
            .iter()
            .enumerate()
            .filter(|(_, r)| {
                r.branch == Stream::Customized.branch() && r.guidance == Guidance::Conditional
            })
            .map(|(i, r)| (i, r.sample))
            .collect();
        if replace {
            for &(row, sample) in &c_rows {
                self.use_f_maps(site, call, row, sample)?;
            }
        }
        if let Some(offsets) = self.offsets.get(&site.layer.path) {
            if !c_rows.is_empty() {
                let v = call.values().clone();
                let add = Self::batch_offsets(offsets, site.rows, &c_rows)?;
                call.set_values((&v + add.to_dtype(v.dtype())?)?)?;
            }
        }
        if let Some(capture) = self.capture {
            capture.record(site, call)?;
        }
        Ok(())
    }
}

/// Records every row's cross-attention probabilities, detached (F's pass before C's).
struct RecordProbs(Mutex<HashMap<String, Tensor>>);

impl AttentionHook for RecordProbs {
    fn wants(&self, layer: &LayerInfo) -> bool {
        layer.kind == AttnKind::CrossAttention
    }

    fn attend(&self, site: &AttnSite<'_>, call: &mut AttentionCall) -> candle_core::Result<()> {
        let rows = (0..site.rows.len())
            .map(|r| call.probs(r)?.unsqueeze(0))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let maps = Tensor::cat(&rows, 0)?.detach();
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(site.layer.path.clone(), maps);
        Ok(())
    }
}

/// The noise predictions of F and C on one batch, one C sample per row: F's pass (no gradient)
/// gives the cross-attention maps; C's pass uses them and adds `edits[row]`. `z_t`: noisy
/// latents; `timesteps`: one per row; `context`: `(b, tokens, width)` text states. Gradients
/// reach the Δs only through the values.
pub fn eps_pair(
    sd: &StableDiffusion,
    z_t: &Tensor,
    timesteps: &[usize],
    context: &Tensor,
    edits: &[SampleEdit<'_>],
) -> Result<(Tensor, Tensor)> {
    let dt = sd.dtype();
    let dev = sd.device();
    let n = z_t.dim(0)?;
    if timesteps.len() != n || edits.len() != n || context.dim(0)? != n {
        return Err(Error::arg(
            "batch",
            format!(
                "{n} latents, {} timesteps, {} sample edits, {} text states",
                timesteps.len(),
                edits.len(),
                context.dim(0)?
            ),
        ));
    }
    let z_t = z_t.to_dtype(dt)?;
    let t = Tensor::new(timesteps.iter().map(|&t| t as f32).collect::<Vec<_>>(), dev)?;
    let ctx = context.to_dtype(dt)?;
    let record = RecordProbs(Mutex::new(HashMap::new()));
    let f_rows = BatchLayout::uniform(n, Stream::Foundational.branch(), Guidance::Conditional);
    let eps_f = sd.unet.forward(
        &z_t,
        &t,
        &ctx,
        Some(&HookCtx {
            hook: &record,
            rows: &f_rows,
            step: None,
        }),
    )?;
    let maps = record.0.into_inner().unwrap_or_else(|e| e.into_inner());
    let offsets = ValueOffsets::new(edits, &sd.unet.attention_layers(), ctx.dim(1)?, dev, dt)?;
    let hook = InfusionHook::new(offsets, FMaps::Recorded(&maps));
    let c_rows = BatchLayout::uniform(n, Stream::Customized.branch(), Guidance::Conditional);
    let eps_c = sd.unet.forward(
        &z_t,
        &t,
        &ctx,
        Some(&HookCtx {
            hook: &hook,
            rows: &c_rows,
            step: None,
        }),
    )?;
    Ok((eps_f, eps_c))
}
