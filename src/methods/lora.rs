//! LoRA (Hu et al.; DreamBooth-LoRA as diffusers' `examples/dreambooth/train_dreambooth_lora.py`
//! trains it, and the files kohya's scripts write): a low-rank update of linear modules,
//! `out += scale * (alpha / rank) * (x @ down^T) @ up^T`. The attention projections go through
//! the attention hook's projection seam, the transformers' other linears (`proj_in`, `proj_out`,
//! the feed-forward's) and the text encoder's through its module seam; in the UNet only the rows
//! of one branch change, so that in a batched run C gets the update and F stays the plain model.
//! `scale` is the LoRA's strength (diffusers' `cross_attention_kwargs={"scale": s}`).
//!
//! Files: diffusers' `save_lora_weights` layout (`unet.MODULE.lora.down.weight` /
//! `.lora.up.weight`), PEFT's (`.lora_A.weight` / `.lora_B.weight`, with or without `unet.`),
//! and kohya's / AUTOMATIC1111's (`lora_unet_MODULE.lora_down.weight`, `.lora_up.weight`,
//! `.alpha`, MODULE with `_` for `.`; `lora_te_` for the text encoder).

use std::any::Any;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;

use super::common::{check_trigger, ddpm_loss, in_file, name_and_word, not_a, Origin};
use super::files::{check_float, Found, Provenance};
use super::{
    count, word, Change, ConceptRef, ConceptRequest, CustomConcept, HookMaker, Method, Setting,
    SettingValue, Settings, Words,
};
use crate::error::{Error, Result};
use crate::job::Job;
use crate::sd::attention::{AttentionCall, LayerInfo};
use crate::sd::hook::{AttentionHook, AttnSite, BatchLayout, Branch, ModuleHook, Projection};
use crate::sd::pipeline::StableDiffusion;
use crate::train::{Batch, Learner, Run, Trainer, TrainingSet};
use crate::util::tensors::plain_values;

/// The rank diffusers' script trains by default.
pub const DEFAULT_RANK: usize = 4;
/// The identifier DreamBooth's prompts put before the class word by default.
pub const DEFAULT_TRIGGER: &str = "sks";

/// The method: DreamBooth-LoRA.
pub struct Lora;

const SETTINGS: [Setting; 2] = [
    Setting {
        name: "rank",
        doc: "the rank of its factors",
        default: SettingValue::Count(DEFAULT_RANK),
    },
    Setting {
        name: "trigger",
        doc: "the identifier prompts put before the class word",
        default: SettingValue::Word(DEFAULT_TRIGGER),
    },
];

impl Method for Lora {
    fn name(&self) -> &'static str {
        "lora"
    }

    fn about(&self) -> &'static str {
        "rank-4 factors on the attention projections, prompts saying `trigger word` \
         (diffusers' train_dreambooth_lora.py)"
    }

    fn settings(&self) -> &'static [Setting] {
        &SETTINGS
    }

    fn default_steps(&self) -> usize {
        500
    }

    fn default_lr(&self, _: usize, _: bool) -> f64 {
        1e-4
    }

    fn takes_prior(&self) -> bool {
        true
    }

    fn learner<'a>(
        &self,
        sd: &'a StableDiffusion,
        settings: &Settings,
        _: &str,
        seed: u64,
    ) -> Result<Box<dyn Learner + 'a>> {
        Ok(Box::new(LoraLearner::new(
            sd,
            count(settings, "rank")?,
            word(settings, "trigger")?,
            seed,
        )?))
    }

    fn reached(&self, trainer: &Trainer<'_>, settings: &Settings) -> Result<ConceptRef> {
        Ok(Arc::new(LoraLearner::concept(
            trainer.model(),
            trainer.vars(),
            &trainer.run_info(),
            word(settings, "trigger")?,
        )?))
    }

    fn claims(&self, found: &Found) -> bool {
        matches!(found, Found::File { .. }) && found.keys().iter().any(|k| k.contains("lora"))
    }

    fn load(
        &self,
        found: &Found,
        req: &ConceptRequest,
        sd: Option<&StableDiffusion>,
        job: &Job,
    ) -> Result<ConceptRef> {
        req.refuse_others(self.name(), &["word", "scale", "trigger"])?;
        let recorded = found.provenance()?;
        let lora = read_lora(found)?;
        let stem = found
            .path()
            .file_stem()
            .map_or_else(String::new, |s| s.to_string_lossy().into_owned());
        let default_name = recorded.name.clone().unwrap_or(stem);
        let (name, word) = name_and_word(req, default_name, recorded.word.as_deref())?;
        let trigger = req.trigger.clone().or_else(|| recorded.trigger.clone());
        if let Some(t) = &trigger {
            check_trigger(t)?;
        }
        let concept = LoraConcept {
            name,
            word,
            lora,
            scale: req.scale.unwrap_or(1.0),
            trigger,
            origin: Origin::recorded(&recorded),
        };
        if let Some(sd) = sd {
            concept
                .check(sd, false, job)
                .map_err(|e| in_file(e, found.path()))?;
        }
        Ok(Arc::new(concept))
    }
}

/// A LoRA, as a session holds it: its layers, strength and trigger.
#[derive(Debug, Clone)]
pub struct LoraConcept {
    pub name: String,
    pub word: String,
    pub lora: LoraFile,
    pub scale: f64,
    /// C's prompt says `trigger word` where F's says the word.
    pub trigger: Option<String>,
    pub origin: Origin,
}

impl CustomConcept for LoraConcept {
    fn name(&self) -> &str {
        &self.name
    }

    fn word(&self) -> &str {
        &self.word
    }

    fn method(&self) -> &'static str {
        "lora"
    }

    fn size_bytes(&self) -> usize {
        self.lora
            .layers
            .iter()
            .map(|l| (l.down.elem_count() + l.up.elem_count()) * 4)
            .sum()
    }

    fn summary(&self) -> String {
        format!(
            "Concept(<{}> = {}{}, lora, {} layers, scale {})",
            self.name,
            self.trigger
                .as_deref()
                .map(|t| format!("{t} "))
                .unwrap_or_default(),
            self.word,
            self.lora.layers.len(),
            self.scale
        )
    }

    fn provenance(&self) -> Provenance {
        Provenance {
            method: Some(self.method().into()),
            name: Some(self.name.clone()),
            word: Some(self.word.clone()),
            trigger: self.trigger.clone(),
            rank: self.lora.layers.first().map(LoraLayer::rank),
            base_model: self.origin.base_model.clone(),
            train_steps: self.origin.train_steps,
        }
    }

    /// As diffusers' `save_lora_weights` writes it (`unet.MODULE.lora.down.weight` /
    /// `.lora.up.weight`, for `load_lora_weights`), with its provenance in the metadata.
    fn save(&self, path: &Path, _: bool) -> Result<()> {
        if self.lora.layout == LoraLayout::Kohya {
            return Err(Error::Unsupported(format!(
                "<{}> was read from a kohya file: copy that file instead",
                self.name
            )));
        }
        let cpu = |t: &Tensor| -> Result<Tensor> {
            Ok(t.to_dtype(DType::F32)?
                .to_device(&Device::Cpu)?
                .contiguous()?)
        };
        let mut tensors = vec![];
        for l in &self.lora.layers {
            let model = match l.target {
                LoraTarget::Unet => "unet",
                LoraTarget::TextEncoder => "text_encoder",
            };
            // kohya's alpha, folded into the up factor (these names carry none).
            let up = (cpu(&l.up)? * l.alpha_scale())?;
            tensors.push((
                format!("{model}.{}.lora.down.weight", l.module),
                cpu(&l.down)?,
            ));
            tensors.push((format!("{model}.{}.lora.up.weight", l.module), up));
        }
        super::files::write_safetensors(path, tensors, self.provenance().to_metadata())
    }

    /// Its modules and shapes against `sd`'s.
    fn check(&self, sd: &StableDiffusion, _: bool, job: &Job) -> Result<()> {
        self.origin.warn_other_model(&self.name, sd, job);
        LoraHook::new(&self.lora, sd, self.scale, Some(Branch(1))).map(|_| ())
    }

    fn scale(&self) -> Option<f64> {
        Some(self.scale)
    }

    fn renamed(&self, name: &str) -> ConceptRef {
        Arc::new(Self {
            name: name.to_string(),
            ..self.clone()
        })
    }

    fn change(&self) -> Change<'_> {
        let words = match &self.trigger {
            Some(t) => vec![Words::Text(format!("{t} {}", self.word))],
            None => vec![],
        };
        Change {
            words,
            residuals: None,
            hooks: Some(self),
            unet: None,
        }
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl HookMaker for LoraConcept {
    fn unet_hook(&self, sd: &StableDiffusion, branch: Branch) -> Result<Box<dyn AttentionHook>> {
        Ok(Box::new(LoraHook::new(
            &self.lora,
            sd,
            self.scale,
            Some(branch),
        )?))
    }

    fn text_hook(&self, sd: &StableDiffusion) -> Result<Option<Box<dyn AttentionHook>>> {
        let hook = LoraHook::new(&self.lora, sd, self.scale, None)?;
        Ok(hook
            .changes_text()
            .then(|| Box::new(hook) as Box<dyn AttentionHook>))
    }
}

/// Which model a LoRA layer adapts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraTarget {
    Unet,
    TextEncoder,
}

/// How a file names its LoRA modules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraLayout {
    /// `unet.MODULE.lora.down.weight` (diffusers' `save_lora_weights`).
    Diffusers,
    /// `unet.MODULE.lora_A.weight` (PEFT).
    Peft,
    /// `lora_unet_MODULE_WITH_UNDERSCORES.lora_down.weight` + `.alpha` (kohya, AUTOMATIC1111).
    Kohya,
}

/// One adapted linear layer: `W' = W + scale * (alpha / rank) * up @ down`.
#[derive(Debug, Clone)]
pub struct LoraLayer {
    pub target: LoraTarget,
    /// The module's path as the file names it: dotted for diffusers and PEFT
    /// (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`), with `_` for `.` for
    /// kohya (resolved against the model's modules when applied).
    pub module: String,
    /// `(rank, in)`.
    pub down: Tensor,
    /// `(out, rank)`.
    pub up: Tensor,
    /// kohya's `alpha`; diffusers and PEFT files have none (alpha = rank).
    pub alpha: Option<f64>,
}

impl LoraLayer {
    pub fn rank(&self) -> usize {
        self.down.dims()[0]
    }

    /// `alpha / rank` (1 without an alpha).
    pub fn alpha_scale(&self) -> f64 {
        self.alpha.map_or(1.0, |a| a / self.rank() as f64)
    }
}

/// A LoRA file's layers.
#[derive(Debug, Clone)]
pub struct LoraFile {
    pub layout: LoraLayout,
    pub layers: Vec<LoraLayer>,
}

impl LoraFile {
    pub fn unet_layers(&self) -> impl Iterator<Item = &LoraLayer> {
        self.layers.iter().filter(|l| l.target == LoraTarget::Unet)
    }

    pub fn text_encoder_layers(&self) -> impl Iterator<Item = &LoraLayer> {
        self.layers
            .iter()
            .filter(|l| l.target == LoraTarget::TextEncoder)
    }
}

/// The factor names of each layout: (down, up). One file may mix the first three: diffusers'
/// training scripts convert the attention projections' names (`.lora.down`, the text encoder's
/// `.lora_linear_layer.down`) and leave the other modules' as peft's.
const FACTORS: [(LoraLayout, &str, &str); 4] = [
    (
        LoraLayout::Diffusers,
        ".lora.down.weight",
        ".lora.up.weight",
    ),
    (
        LoraLayout::Diffusers,
        ".lora_linear_layer.down.weight",
        ".lora_linear_layer.up.weight",
    ),
    (LoraLayout::Peft, ".lora_A.weight", ".lora_B.weight"),
    (LoraLayout::Kohya, ".lora_down.weight", ".lora_up.weight"),
];

/// A LoRA file's layers, each with both factors (and kohya's alpha); every tensor must be one.
pub fn read_lora(found: &Found) -> Result<LoraFile> {
    let tensors = found.tensors()?;
    let bad = |msg: String| found.error(msg);
    let factors = |key: &str| {
        FACTORS
            .iter()
            .copied()
            .find(|(_, down, _)| key.ends_with(down))
    };
    // The file's layout: kohya's names are its own; diffusers' wins over peft's in a mix.
    let layout = FACTORS
        .iter()
        .map(|(layout, ..)| *layout)
        .find(|l| {
            tensors
                .keys()
                .any(|k| factors(k).is_some_and(|f| f.0 == *l))
        })
        .ok_or_else(|| {
            bad(format!(
                "it names LoRA tensors (e.g. `{}`) but none ends in .lora.down.weight, \
                 .lora_linear_layer.down.weight, .lora_A.weight or .lora_down.weight",
                tensors.keys().next().map(String::as_str).unwrap_or("")
            ))
        })?;
    let kohya = layout == LoraLayout::Kohya;
    let mut layers = vec![];
    // Every tensor must be read as a factor or an alpha: anything else (a LyCORIS part, a
    // stray key) would change nothing without a word.
    let mut used = std::collections::BTreeSet::new();
    for (key, down) in &tensors {
        let Some((_, down_suffix, up_suffix)) =
            factors(key).filter(|f| (f.0 == LoraLayout::Kohya) == kohya)
        else {
            continue;
        };
        let stem = &key[..key.len() - down_suffix.len()];
        let up = tensors
            .get(&format!("{stem}{up_suffix}"))
            .ok_or_else(|| bad(format!("`{key}` has no `{stem}{up_suffix}`")))?;
        let (target, module) = split_target(layout, stem).ok_or_else(|| {
            bad(format!(
                "`{key}`: a LoRA module of neither the UNet nor the text encoder"
            ))
        })?;
        // diffusers' scripts write the text encoder's paths without `text_model.`.
        let module = match target {
            LoraTarget::TextEncoder if !kohya && !module.starts_with("text_model.") => {
                format!("text_model.{module}")
            }
            _ => module.to_string(),
        };
        let alpha = match tensors.get(&format!("{stem}.alpha")) {
            Some(a) => Some(
                a.to_dtype(DType::F64)?
                    .flatten_all()?
                    .to_vec1::<f64>()?
                    .first()
                    .copied()
                    .ok_or_else(|| bad(format!("`{stem}.alpha` is empty")))?,
            ),
            None => None,
        };
        used.extend([
            key.clone(),
            format!("{stem}{up_suffix}"),
            format!("{stem}.alpha"),
        ]);
        let (down, up) = (factor(down, key, &bad)?, factor(up, key, &bad)?);
        if down.dims()[0] != up.dims()[1] {
            return Err(bad(format!(
                "`{key}` has rank {} but its up factor {:?} takes {}",
                down.dims()[0],
                up.dims(),
                up.dims()[1]
            )));
        }
        layers.push(LoraLayer {
            target,
            module,
            down,
            up,
            alpha,
        });
    }
    let unread: Vec<&String> = tensors.keys().filter(|k| !used.contains(*k)).collect();
    if let Some(first) = unread.first() {
        let lycoris = ["hada_", "lokr_", "lora_mid", "dora_scale", ".diff", "oft_"];
        let shown = unread
            .iter()
            .take(3)
            .map(|k| format!("`{k}`"))
            .collect::<Vec<_>>()
            .join(", ");
        if unread.iter().any(|k| lycoris.iter().any(|p| k.contains(p))) {
            return Err(bad(format!(
                "{shown} ({} tensors) belong to a LyCORIS adapter (LoHa, LoKr, LoCon, DoRA, \
                 OFT), which this tool does not apply: it reads plain LoRA factors",
                unread.len()
            )));
        }
        // An orphan up factor is said as such below.
        if !FACTORS.iter().any(|(_, _, up)| first.ends_with(up)) {
            return Err(bad(format!(
                "{shown} ({} tensors) are not LoRA factors or alphas, so they would be \
                 ignored: this tool reads plain LoRA files (of SD1.x)",
                unread.len()
            )));
        }
    }
    if let Some(orphan) = tensors.keys().find(|k| {
        FACTORS.iter().any(|(_, down, up)| {
            k.ends_with(up) && !tensors.contains_key(&format!("{}{down}", &k[..k.len() - up.len()]))
        })
    }) {
        return Err(bad(format!("`{orphan}` has no down factor")));
    }
    Ok(LoraFile { layout, layers })
}

/// A factor as a matrix (`[a, b]`, or a 1x1 convolution's `[a, b, 1, 1]`), in f32.
fn factor(t: &Tensor, key: &str, bad: &dyn Fn(String) -> Error) -> Result<Tensor> {
    check_float(key, t, &bad)?;
    let t = t.to_dtype(DType::F32)?;
    match t.dims() {
        [_, _] => Ok(t),
        [a, b, 1, 1] => Ok(t.reshape((*a, *b))?),
        d => Err(bad(format!(
            "`{key}` has shape {d:?}: a LoRA factor of a linear layer is a matrix"
        ))),
    }
}

/// The target and module path of a layer's stem in `layout`.
fn split_target(layout: LoraLayout, stem: &str) -> Option<(LoraTarget, &str)> {
    let prefixes: &[(&str, LoraTarget)] = match layout {
        LoraLayout::Kohya => &[
            ("lora_unet_", LoraTarget::Unet),
            ("lora_te_", LoraTarget::TextEncoder),
        ],
        _ => &[
            ("unet.", LoraTarget::Unet),
            ("text_encoder.", LoraTarget::TextEncoder),
        ],
    };
    for (p, target) in prefixes {
        if let Some(rest) = stem.strip_prefix(p) {
            return Some((*target, rest));
        }
    }
    // PEFT files saved from the UNet alone name its modules bare.
    (layout != LoraLayout::Kohya).then_some((LoraTarget::Unet, stem))
}

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
        crate::sd::unet::UNet::new(vb, sd.unet.config(), sd.kernels()).map(|_| ())
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
        lora: &LoraFile,
        sd: &StableDiffusion,
        scale: f64,
        branch: Option<Branch>,
    ) -> Result<Self> {
        Self::bind(lora, &all_targets(sd)?, sd, scale, branch)
    }

    /// [`LoraHook::new`] against `targets` (from [`targets`] or [`all_targets`] of `sd`).
    pub fn bind(
        lora: &LoraFile,
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
                output + delta.broadcast_mul(&rows.branch_mask(branch, &delta)?)?
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

/// DreamBooth-LoRA: rank-`rank` factors on every attention projection, `down` drawn as peft's
/// gaussian init (normal with standard deviation 1/rank), `up` zero, so training starts from the
/// plain model; prompts say `trigger word`.
pub struct LoraLearner {
    rank: usize,
    trigger: String,
    /// The projections it adapts, resolved once.
    targets: Vec<super::lora::Target>,
    vars: BTreeMap<String, Var>,
    initial: BTreeMap<String, Tensor>,
}

impl LoraLearner {
    pub fn new(sd: &StableDiffusion, rank: usize, trigger: &str, seed: u64) -> Result<Self> {
        if rank == 0 {
            return Err(Error::arg("rank", "must be at least 1"));
        }
        check_trigger(trigger)?;
        let targets = targets(sd)?;
        // A rank past a layer's size adds nothing and its factors can exhaust memory.
        if let Some(small) = targets.iter().map(|t| t.shape[0].min(t.shape[1])).min() {
            if rank > small {
                return Err(Error::arg(
                    "rank",
                    format!(
                        "{rank} is more than the smallest adapted layer's size ({small}): a \
                         LoRA's rank is at most that (diffusers' default is 4)"
                    ),
                ));
            }
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut vars = BTreeMap::new();
        for t in &targets {
            let (module, [out, inp]) = (t.module(), t.shape);
            let down = (crate::util::noise::normal(&mut rng, &[rank, inp], sd.device())?
                * (1.0 / rank as f64))?;
            let up = Tensor::zeros((out, rank), DType::F32, sd.device())?;
            vars.insert(
                format!("{module}.lora.down.weight"),
                Var::from_tensor(&down)?,
            );
            vars.insert(format!("{module}.lora.up.weight"), Var::from_tensor(&up)?);
        }
        // Owned copies: a detached view would follow the training.
        let initial = plain_values(&vars)?;
        Ok(Self {
            rank,
            trigger: trigger.to_string(),
            targets,
            vars,
            initial,
        })
    }

    fn lora(params: &BTreeMap<String, Tensor>) -> LoraFile {
        let layers = params
            .iter()
            .filter_map(|(k, down)| {
                let module = k.strip_suffix(".lora.down.weight")?;
                Some(LoraLayer {
                    target: LoraTarget::Unet,
                    module: module.to_string(),
                    down: down.clone(),
                    up: params[&format!("{module}.lora.up.weight")].clone(),
                    alpha: None,
                })
            })
            .collect();
        LoraFile {
            layout: LoraLayout::Diffusers,
            layers,
        }
    }

    /// The LoRA learned in `vars` (a trainer's, of this learner, on `sd`), as a concept
    /// (strength 1, `trigger` before its word).
    pub fn concept(
        sd: &StableDiffusion,
        vars: &BTreeMap<String, Var>,
        run: &Run<'_>,
        trigger: &str,
    ) -> Result<LoraConcept> {
        let params: BTreeMap<String, Tensor> = plain_values(vars)?
            .into_iter()
            .map(|(k, v)| Ok((k, v.to_device(&Device::Cpu)?)))
            .collect::<Result<_>>()?;
        Ok(LoraConcept {
            name: run.name.to_string(),
            word: run.word.to_string(),
            lora: Self::lora(&params),
            scale: 1.0,
            trigger: Some(trigger.to_string()),
            origin: Origin::of_run(sd, run),
        })
    }
}

impl Learner for LoraLearner {
    fn method(&self) -> &'static str {
        "lora"
    }

    fn words(&self, word: &str) -> String {
        format!("{} {word}", self.trigger)
    }

    fn vars(&self) -> &BTreeMap<String, Var> {
        &self.vars
    }

    fn initial(&self) -> &BTreeMap<String, Tensor> {
        &self.initial
    }

    fn loss(
        &self,
        sd: &StableDiffusion,
        data: &TrainingSet,
        batch: &Batch,
        params: &BTreeMap<String, Tensor>,
    ) -> Result<Tensor> {
        let hook = LoraHook::bind(&Self::lora(params), &self.targets, sd, 1.0, None)?;
        let (states, _) = data.prompts(sd, batch)?;
        ddpm_loss(sd, &sd.unet, data, batch, &states, Some(&hook))
    }

    fn settings(&self) -> serde_json::Value {
        serde_json::json!({ "rank": self.rank, "trigger": self.trigger })
    }

    /// The layout diffusers' `save_lora_weights` writes.
    fn save(&self, sd: &StableDiffusion, run: &Run<'_>, dir: &Path, stem: &str) -> Result<PathBuf> {
        let path = dir.join(format!("{stem}.safetensors"));
        Self::concept(sd, &self.vars, run, &self.trigger)?.save(&path, true)?;
        Ok(path)
    }

    fn read(
        &mut self,
        _: &StableDiffusion,
        path: &Path,
        _: &Job,
    ) -> Result<BTreeMap<String, Tensor>> {
        let found = Found::read(path)?;
        if !Lora.claims(&found) {
            return Err(not_a(path, "LoRA"));
        }
        let lora = read_lora(&found)?;
        let mut params = BTreeMap::new();
        for l in lora.layers {
            params.insert(format!("{}.lora.down.weight", l.module), l.down);
            params.insert(format!("{}.lora.up.weight", l.module), l.up);
        }
        Ok(params)
    }
}
