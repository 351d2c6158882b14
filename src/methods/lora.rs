//! LoRA (Hu et al.; DreamBooth-LoRA as diffusers trains it): a low-rank update of the attention
//! projections, `out += scale * (alpha / rank) * (x @ down^T) @ up^T`, applied through the
//! attention hook's projection seam to the rows of one branch, so that in a batched run C gets
//! the update and F stays the plain model. `scale` is the LoRA's strength (diffusers'
//! `cross_attention_kwargs={"scale": s}`).

use std::collections::{HashMap, HashSet};

use candle_core::{DType, Device, Tensor};

use super::files::{Lora, LoraLayout};
use crate::error::{Error, Result};
use crate::sd::attention::{AttentionCall, LayerInfo};
use crate::sd::hook::{AttentionHook, AttnSite, Branch, Projection};
use crate::sd::pipeline::StableDiffusion;

/// One adapted projection: `down^T` (in, rank) and `scale * alpha / rank * up^T` (rank, out).
struct Factors {
    down_t: Tensor,
    up_t: Tensor,
}

/// A LoRA as an attention hook.
pub struct LoraHook {
    factors: HashMap<(String, Projection), Factors>,
    layers: HashSet<String>,
    /// The rows it changes: one branch's, or every row.
    branch: Option<Branch>,
}

/// One attention projection of a UNet: its layer's path, which projection, and its weight's
/// shape `[out, in]`.
#[derive(Debug, Clone)]
pub struct Target {
    pub path: String,
    pub projection: Projection,
    pub shape: [usize; 2],
}

impl Target {
    /// Its module's path, `LAYER.to_q`.
    pub fn module(&self) -> String {
        format!("{}.{}", self.path, self.projection.module())
    }
}

/// The attention projections a LoRA can adapt in `sd`'s UNet (read from its config once: a
/// trainer binds new factors to them every step).
pub fn targets(sd: &StableDiffusion) -> Result<Vec<Target>> {
    let weights: HashMap<String, Vec<usize>> = crate::sd::weights::tensors_asked(|vb| {
        crate::sd::unet::UNet::new(vb, sd.unet.config()).map(|_| ())
    })?
    .into_iter()
    .collect();
    let mut out = vec![];
    for layer in sd.unet.attention_layers() {
        for projection in Projection::ALL {
            let path = layer.path.clone();
            let key = format!("{path}.{}.weight", projection.module());
            if let Some([o, i]) = weights.get(&key).map(|s| [s[0], s[1]]) {
                out.push(Target {
                    path,
                    projection,
                    shape: [o, i],
                });
            }
        }
    }
    Ok(out)
}

impl LoraHook {
    /// Resolves `lora`'s UNet layers against `sd`'s attention projections and checks their
    /// shapes. A layer this tool cannot apply (another module, the text encoder) is refused with
    /// its name; a layer of other shapes with both shapes.
    pub fn new(
        lora: &Lora,
        sd: &StableDiffusion,
        scale: f64,
        branch: Option<Branch>,
    ) -> Result<Self> {
        Self::bind(lora, &targets(sd)?, sd, scale, branch)
    }

    /// [`LoraHook::new`] against `targets` (from [`targets`] of `sd`).
    pub fn bind(
        lora: &Lora,
        targets: &[Target],
        sd: &StableDiffusion,
        scale: f64,
        branch: Option<Branch>,
    ) -> Result<Self> {
        if let Some(l) = lora.text_encoder_layers().next() {
            return Err(Error::Unsupported(format!(
                "this LoRA adapts the text encoder too (`{}` and {} more layers); only UNet \
                 LoRAs are applied",
                l.module,
                lora.text_encoder_layers().count() - 1
            )));
        }
        let name = |t: &Target| match lora.layout {
            LoraLayout::Kohya => t.module().replace('.', "_"),
            _ => t.module(),
        };
        let by_name: HashMap<String, &Target> = targets.iter().map(|t| (name(t), t)).collect();
        let (device, dtype) = (sd.device(), sd.dtype());
        let mut factors = HashMap::new();
        for l in lora.unet_layers() {
            let t = by_name.get(&l.module).ok_or_else(|| {
                Error::Unsupported(format!(
                    "this LoRA adapts `{}`, which is not an attention projection (to_q, to_k, \
                     to_v, to_out.0) of this UNet: only those are applied",
                    l.module
                ))
            })?;
            let (path, p, weight) = (t.path.clone(), t.projection, t.shape);
            let (rank, inp) = (l.down.dims()[0], l.down.dims()[1]);
            let out = l.up.dims()[0];
            if weight != [out, inp] {
                return Err(Error::arg(
                    "lora",
                    format!(
                        "`{}`: the LoRA's factors are down [{rank}, {inp}] and up [{out}, {rank}], \
                         the model's {}.{} is {:?} (a LoRA of another model?)",
                        l.module,
                        path,
                        p.module(),
                        weight
                    ),
                ));
            }
            let gain = scale * l.alpha_scale();
            factors.insert(
                (path, p),
                Factors {
                    down_t: to(&l.down.t()?, device, dtype)?,
                    up_t: to(&(l.up.t()? * gain)?, device, dtype)?,
                },
            );
        }
        Ok(Self {
            layers: factors.keys().map(|(path, _)| path.clone()).collect(),
            factors,
            branch,
        })
    }
}

fn to(t: &Tensor, device: &Device, dtype: DType) -> Result<Tensor> {
    Ok(t.contiguous()?.to_device(device)?.to_dtype(dtype)?)
}

impl AttentionHook for LoraHook {
    fn wants(&self, layer: &LayerInfo) -> bool {
        self.layers.contains(&layer.path)
    }

    fn attend(&self, _: &AttnSite<'_>, _: &mut AttentionCall) -> candle_core::Result<()> {
        Ok(())
    }

    fn project(
        &self,
        site: &AttnSite<'_>,
        projection: Projection,
        input: &Tensor,
        output: Tensor,
    ) -> candle_core::Result<Tensor> {
        let Some(f) = self.factors.get(&(site.layer.path.clone(), projection)) else {
            return Ok(output);
        };
        let delta = input
            .broadcast_matmul(&f.down_t)?
            .broadcast_matmul(&f.up_t)?;
        match self.branch {
            None => output + delta,
            Some(branch) => {
                let mask: Vec<f32> = site
                    .rows
                    .rows()
                    .iter()
                    .map(|r| if r.branch == branch { 1.0 } else { 0.0 })
                    .collect();
                let b = mask.len();
                let mask =
                    Tensor::from_vec(mask, (b, 1, 1), output.device())?.to_dtype(output.dtype())?;
                output + delta.broadcast_mul(&mask)?
            }
        }
    }
}
