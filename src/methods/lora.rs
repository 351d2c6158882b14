//! LoRA (Hu et al.; DreamBooth-LoRA as diffusers trains it, and the files kohya's scripts
//! write): a low-rank update of linear modules, `out += scale * (alpha / rank) * (x @ down^T)
//! @ up^T`. The attention projections go through the attention hook's projection seam, the
//! transformers' other linears (`proj_in`, `proj_out`, the feed-forward's) and the text
//! encoder's through its module seam; in the UNet only the rows of one branch change, so that
//! in a batched run C gets the update and F stays the plain model. `scale` is the LoRA's
//! strength (diffusers' `cross_attention_kwargs={"scale": s}`).

use std::collections::{HashMap, HashSet};

use candle_core::{DType, Device, Tensor};

use super::files::{Lora, LoraLayout, LoraTarget};
use crate::error::{Error, Result};
use crate::sd::attention::{AttentionCall, LayerInfo};
use crate::sd::hook::{AttentionHook, AttnSite, BatchLayout, Branch, ModuleHook, Projection};
use crate::sd::pipeline::StableDiffusion;

/// One adapted module: `down^T` (in, rank) and `scale * alpha / rank * up^T` (rank, out).
struct Factors {
    down_t: Tensor,
    up_t: Tensor,
}

impl Factors {
    fn delta(&self, input: &Tensor) -> candle_core::Result<Tensor> {
        input
            .broadcast_matmul(&self.down_t)?
            .broadcast_matmul(&self.up_t)
    }
}

/// A LoRA as a hook: on the UNet's attention projections and other linears, and on the text
/// encoder's.
pub struct LoraHook {
    factors: HashMap<(String, Projection), Factors>,
    layers: HashSet<String>,
    /// The other modules, by path (the UNet's and the text encoder's).
    modules: HashMap<String, Factors>,
    /// Whether any of `modules` is the text encoder's.
    text: bool,
    /// The UNet rows it changes: one branch's, or every row.
    branch: Option<Branch>,
}

/// Where a module is reached.
#[derive(Debug, Clone, PartialEq)]
pub enum Site {
    /// An attention layer's projection (the layer's path).
    Attention(String, Projection),
    /// Another linear module (or 1x1 convolution) of the UNet.
    Unet,
    /// A linear module of the text encoder.
    Text,
}

/// A linear module a LoRA can adapt: its path, where it is reached, and its weight's shape
/// `[out, in]`.
#[derive(Debug, Clone)]
pub struct Target {
    pub module: String,
    pub site: Site,
    pub shape: [usize; 2],
}

impl Target {
    /// Its module's path (`LAYER.to_q`, `...ff.net.2`, `text_model.encoder.layers.0.mlp.fc1`).
    pub fn module(&self) -> String {
        self.module.clone()
    }
}

/// The UNet's weights' shapes, by name (read from its config: nothing is built).
fn unet_shapes(sd: &StableDiffusion) -> Result<HashMap<String, Vec<usize>>> {
    Ok(crate::sd::weights::tensors_asked(|vb| {
        crate::sd::unet::UNet::new(vb, sd.unet.config()).map(|_| ())
    })?
    .into_iter()
    .collect())
}

/// The attention projections of `sd`'s UNet, what DreamBooth-LoRA trains (resolved once: a
/// trainer binds new factors to them every step).
pub fn targets(sd: &StableDiffusion) -> Result<Vec<Target>> {
    let weights = unet_shapes(sd)?;
    let mut out = vec![];
    for layer in sd.unet.attention_layers() {
        for projection in Projection::ALL {
            let module = format!("{}.{}", layer.path, projection.module());
            if let Some([o, i]) = weights
                .get(&format!("{module}.weight"))
                .map(|s| [s[0], s[1]])
            {
                out.push(Target {
                    module,
                    site: Site::Attention(layer.path.clone(), projection),
                    shape: [o, i],
                });
            }
        }
    }
    Ok(out)
}

/// The UNet modules outside attention a module hook reaches (named as diffusers names them).
const UNET_MODULES: [&str; 4] = [".proj_in", ".proj_out", ".ff.net.0.proj", ".ff.net.2"];

/// Every module a LoRA file can adapt in `sd`: the attention projections, the transformers'
/// `proj_in`, `proj_out` and feed-forward linears, and the text encoder's linears (what kohya's
/// scripts adapt).
pub fn all_targets(sd: &StableDiffusion) -> Result<Vec<Target>> {
    let mut out = targets(sd)?;
    let mut others: Vec<(String, Vec<usize>)> = unet_shapes(sd)?
        .into_iter()
        .filter_map(|(k, shape)| {
            let module = k.strip_suffix(".weight")?;
            UNET_MODULES
                .iter()
                .any(|m| module.ends_with(m))
                .then(|| (module.to_string(), shape))
        })
        .collect();
    others.sort();
    for (module, shape) in others {
        out.push(Target {
            module,
            site: Site::Unet,
            shape: [shape[0], shape[1]],
        });
    }
    for (module, shape) in sd.text_encoder.linear_modules() {
        out.push(Target {
            module,
            site: Site::Text,
            shape,
        });
    }
    Ok(out)
}

impl LoraHook {
    /// Resolves `lora`'s layers against every module of `sd` a LoRA can adapt and checks their
    /// shapes. A layer naming no such module is refused with its name; a layer of other shapes
    /// with both shapes.
    pub fn new(
        lora: &Lora,
        sd: &StableDiffusion,
        scale: f64,
        branch: Option<Branch>,
    ) -> Result<Self> {
        Self::bind(lora, &all_targets(sd)?, sd, scale, branch)
    }

    /// [`LoraHook::new`] against `targets` (from [`targets`] or [`all_targets`] of `sd`).
    pub fn bind(
        lora: &Lora,
        targets: &[Target],
        sd: &StableDiffusion,
        scale: f64,
        branch: Option<Branch>,
    ) -> Result<Self> {
        // kohya's names are the paths with `_` for `.` (`lora_te_` / `lora_unet_` stripped).
        let name = |t: &Target| match lora.layout {
            LoraLayout::Kohya => t.module.replace('.', "_"),
            _ => t.module.clone(),
        };
        let by_name: HashMap<(bool, String), &Target> = targets
            .iter()
            .map(|t| ((t.site == Site::Text, name(t)), t))
            .collect();
        let (device, dtype) = (sd.device(), sd.dtype());
        let mut hook = Self {
            factors: HashMap::new(),
            layers: HashSet::new(),
            modules: HashMap::new(),
            text: false,
            branch,
        };
        for l in &lora.layers {
            let text = l.target == LoraTarget::TextEncoder;
            let t = by_name.get(&(text, l.module.clone())).ok_or_else(|| {
                Error::Unsupported(format!(
                    "this LoRA adapts `{}`, which is not a module a LoRA can adapt in this \
                     model's {} (attention projections, proj_in, proj_out and feed-forward \
                     linears of the UNet; the text encoder's linears)",
                    l.module,
                    if text { "text encoder" } else { "UNet" }
                ))
            })?;
            let (rank, inp) = (l.down.dims()[0], l.down.dims()[1]);
            let out = l.up.dims()[0];
            if t.shape != [out, inp] {
                return Err(Error::arg(
                    "lora",
                    format!(
                        "`{}`: the LoRA's factors are down [{rank}, {inp}] and up [{out}, {rank}], \
                         the model's {} is {:?} (a LoRA of another model?)",
                        l.module, t.module, t.shape
                    ),
                ));
            }
            let gain = scale * l.alpha_scale();
            let factors = Factors {
                down_t: to(&l.down.t()?, device, dtype)?,
                up_t: to(&(l.up.t()? * gain)?, device, dtype)?,
            };
            match &t.site {
                Site::Attention(path, p) => {
                    hook.layers.insert(path.clone());
                    hook.factors.insert((path.clone(), *p), factors);
                }
                Site::Unet | Site::Text => {
                    hook.text |= text;
                    hook.modules.insert(t.module.clone(), factors);
                }
            }
        }
        Ok(hook)
    }

    /// Whether it changes the text encoder (C's text states are then its own).
    pub fn changes_text(&self) -> bool {
        self.text
    }

    /// `delta` on the rows of the hook's branch only (every row without a branch or rows).
    fn on_rows(
        &self,
        rows: Option<&BatchLayout>,
        output: Tensor,
        delta: Tensor,
    ) -> candle_core::Result<Tensor> {
        match (self.branch, rows) {
            (Some(branch), Some(rows)) => {
                let mask: Vec<f32> = rows
                    .rows()
                    .iter()
                    .map(|r| if r.branch == branch { 1.0 } else { 0.0 })
                    .collect();
                let b = mask.len();
                let mask =
                    Tensor::from_vec(mask, (b, 1, 1), output.device())?.to_dtype(output.dtype())?;
                output + delta.broadcast_mul(&mask)?
            }
            _ => output + delta,
        }
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
        match self.factors.get(&(site.layer.path.clone(), projection)) {
            Some(f) => self.on_rows(Some(site.rows), output, f.delta(input)?),
            None => Ok(output),
        }
    }

    fn modules(&self) -> Option<&dyn ModuleHook> {
        (!self.modules.is_empty()).then_some(self as &dyn ModuleHook)
    }
}

impl ModuleHook for LoraHook {
    fn wants_module(&self, path: &str) -> bool {
        self.modules.contains_key(path)
    }

    fn module(
        &self,
        path: &str,
        rows: Option<&BatchLayout>,
        input: &Tensor,
        output: Tensor,
    ) -> candle_core::Result<Tensor> {
        match self.modules.get(path) {
            Some(f) => self.on_rows(rows, output, f.delta(input)?),
            None => Ok(output),
        }
    }
}
