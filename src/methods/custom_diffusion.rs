//! Custom Diffusion (Kumari et al. 2023), as diffusers' `examples/custom_diffusion/
//! train_custom_diffusion.py` trains it: in every cross-attention layer, new key and value
//! projections (`freeze_model: crossattn_kv`, the default; `crossattn` also the query and output
//! projections) start from the model's own, and a modifier token (`<new1>`, from the
//! vocabulary entry `ktn`) stands before the class word in C's prompts ("photo of a <new1>
//! cat"). Training as the script: AdamW (weight decay 1e-2) on the projections and the token's
//! vector, gradients clipped to norm 1, lr 1e-5 x batch (x2 with prior preservation), the
//! first (BOS) token's key and value without gradient, the script's scale augmentation with
//! its masked loss and prompt prefixes (`Augment::Scale`), batch 2, 250 steps.
//!
//! Where ours departs: the script's AdamW also decays every other row of the token embedding
//! matrix (by lr x 1e-2 a step, 2e-7 relative); we train the modifier's row alone and leave the
//! model's text encoder as it is. Our templates (or the user's) stand in for the script's one
//! instance prompt, with `<new1> word` in the place of `{}`.
//!
//! Files, as the script writes them, in a folder: `pytorch_custom_diffusion_weights.safetensors`
//! (`LAYER.processor.to_k_custom_diffusion.weight`, ...) and `<new1>.safetensors`
//! (`{"<new1>": [width]}`; the script names it `<new1>.bin` while writing safetensors, which we
//! read too), and ours beside them, `infusion_concept.json`.

use std::any::Any;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};

use super::common::{ddpm_loss, in_file, name_and_word, not_a, on_branch, Origin};
use super::files::{check_float, write_safetensors, Found, Provenance};
use super::words::{text_states, Embedding};
use super::{
    word, Change, ConceptRef, ConceptRequest, CustomConcept, HookMaker, Method, Setting,
    SettingValue, Settings, Words,
};
use crate::error::{Error, Result};
use crate::job::Job;
use crate::sd::attention::{AttentionCall, LayerInfo};
use crate::sd::hook::{AttentionHook, AttnSite, Branch, Projection};
use crate::sd::pipeline::StableDiffusion;
use crate::train::{Augment, Batch, Learner, Run, Trainer, TrainingSet};
use crate::util::tensors::plain_values;

/// The method.
pub struct CustomDiffusion;

/// The modifier token diffusers' recipe uses.
pub const DEFAULT_MODIFIER: &str = "<new1>";
/// The vocabulary entry its vector starts from.
pub const DEFAULT_INITIALIZER: &str = "ktn";
/// The text tokenized where the modifier token goes: its tokens are replaced by the modifier's
/// one vector (any text would do; this one is short).
const STAND_IN: &str = "ktn";
/// The weights file the script writes.
pub const WEIGHTS_FILE: &str = "pytorch_custom_diffusion_weights.safetensors";
/// The modifier token's vector among a learner's parameters.
const TOKEN: &str = "token";

const SETTINGS: [Setting; 3] = [
    Setting {
        name: "freeze_model",
        doc: "crossattn_kv (train the cross-attention layers' key and value projections, the \
              script's default) or crossattn (their query and output projections too)",
        default: SettingValue::Word("crossattn_kv"),
    },
    Setting {
        name: "modifier_token",
        doc: "the new token before the class word in C's prompts",
        default: SettingValue::Word(DEFAULT_MODIFIER),
    },
    Setting {
        name: "initializer_token",
        doc: "the vocabulary entry the modifier token's vector starts from",
        default: SettingValue::Word(DEFAULT_INITIALIZER),
    },
];

/// Which projections of the cross-attention layers train.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Freeze {
    CrossattnKv,
    Crossattn,
}

impl Freeze {
    fn parse(s: &str) -> Result<Self> {
        match s {
            "crossattn_kv" => Ok(Freeze::CrossattnKv),
            "crossattn" => Ok(Freeze::Crossattn),
            other => Err(Error::arg(
                "freeze_model",
                format!("`{other}`: crossattn_kv or crossattn"),
            )),
        }
    }

    /// The trained parameters of a layer, as the script names them.
    fn parts(self) -> &'static [Part] {
        match self {
            Freeze::CrossattnKv => &PARTS[..2],
            Freeze::Crossattn => &PARTS,
        }
    }
}

/// A trained tensor of a layer: its name under the layer's processor, the projection it
/// replaces, and whether it is that projection's bias.
struct Part {
    name: &'static str,
    projection: Projection,
    bias: bool,
}

const PARTS: [Part; 5] = [
    Part {
        name: "to_k_custom_diffusion.weight",
        projection: Projection::Key,
        bias: false,
    },
    Part {
        name: "to_v_custom_diffusion.weight",
        projection: Projection::Value,
        bias: false,
    },
    Part {
        name: "to_q_custom_diffusion.weight",
        projection: Projection::Query,
        bias: false,
    },
    Part {
        name: "to_out_custom_diffusion.0.weight",
        projection: Projection::Out,
        bias: false,
    },
    Part {
        name: "to_out_custom_diffusion.0.bias",
        projection: Projection::Out,
        bias: true,
    },
];

fn part(name: &str) -> Option<&'static Part> {
    PARTS.iter().find(|p| p.name == name)
}

impl Method for CustomDiffusion {
    fn name(&self) -> &'static str {
        "custom_diffusion"
    }

    fn about(&self) -> &'static str {
        "the cross-attention layers' key and value projections and a modifier token before the \
         class word (diffusers' train_custom_diffusion.py)"
    }

    fn settings(&self) -> &'static [Setting] {
        &SETTINGS
    }

    /// The script's README recipe.
    fn default_steps(&self) -> usize {
        250
    }

    /// The script's README recipe.
    fn default_batch(&self) -> usize {
        2
    }

    /// 1e-5 scaled by the batch (the recipe's `--scale_lr`), doubled with prior preservation.
    fn default_lr(&self, batch: usize, prior: bool) -> f64 {
        1e-5 * batch as f64 * if prior { 2.0 } else { 1.0 }
    }

    fn takes_prior(&self) -> bool {
        true
    }

    fn saves_folder(&self) -> bool {
        true
    }

    fn default_out(&self, name: &str) -> PathBuf {
        PathBuf::from(format!("{name}-custom-diffusion"))
    }

    fn learner<'a>(
        &self,
        sd: &'a StableDiffusion,
        settings: &Settings,
        _: &str,
        _: u64,
    ) -> Result<Box<dyn Learner + 'a>> {
        Ok(Box::new(ModifiedLayers::new(sd, settings)?))
    }

    fn reached(&self, trainer: &Trainer<'_>, settings: &Settings) -> Result<ConceptRef> {
        Ok(Arc::new(ModifiedLayers::concept(
            trainer.model(),
            trainer.vars(),
            &trainer.run_info(),
            word(settings, "modifier_token")?,
        )?))
    }

    fn claims(&self, found: &Found) -> bool {
        matches!(found, Found::Folder(dir) if dir.join(WEIGHTS_FILE).is_file())
    }

    fn load(
        &self,
        found: &Found,
        req: &ConceptRequest,
        sd: Option<&StableDiffusion>,
        job: &Job,
    ) -> Result<ConceptRef> {
        req.refuse_others(self.name(), &["word"])?;
        let dir = found.path();
        let recorded = found.provenance()?;
        let weights = read_weights(dir)?;
        let (modifier, vector) = read_modifier(dir, recorded.trigger.as_deref())?;
        let folder = dir
            .file_name()
            .map_or_else(String::new, |s| s.to_string_lossy().into_owned());
        let default_name = recorded.name.clone().unwrap_or(folder);
        let (name, word) = name_and_word(req, default_name, recorded.word.as_deref())?;
        let concept = LayersConcept {
            name,
            word,
            modifier,
            vector,
            weights,
            origin: Origin::recorded(&recorded),
        };
        if let Some(sd) = sd {
            concept.check(sd, false, job).map_err(|e| in_file(e, dir))?;
        }
        Ok(Arc::new(concept))
    }
}

/// The trained projections of a folder's weights file, by `LAYER.PART` (the file's names
/// without `.processor`).
fn read_weights(dir: &Path) -> Result<BTreeMap<String, Tensor>> {
    let path = dir.join(WEIGHTS_FILE);
    let found = Found::read(&path)?;
    let bad = |msg: String| found.error(msg);
    let mut out = BTreeMap::new();
    for (key, t) in found.tensors()? {
        let Some((layer, name)) = key.split_once(".processor.") else {
            return Err(bad(format!(
                "`{key}` is not LAYER.processor.PART: not a Custom Diffusion weights file"
            )));
        };
        if part(name).is_none() {
            return Err(bad(format!(
                "`{key}`: `{name}` is not a Custom Diffusion projection"
            )));
        }
        check_float(&key, &t, &bad)?;
        out.insert(format!("{layer}.{name}"), t.to_dtype(DType::F32)?);
    }
    if out.is_empty() {
        return Err(bad("no projections".into()));
    }
    Ok(out)
}

/// The modifier token's name and vector `[1, width]` from the folder's token file
/// (`<new1>.safetensors`, or `<new1>.bin` holding safetensors as the script writes it); the
/// one named `recorded` when our record names it.
fn read_modifier(dir: &Path, recorded: Option<&str>) -> Result<(String, Tensor)> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default();
            name.starts_with('<')
                && (name.ends_with(".safetensors") || name.ends_with(".bin"))
                && p.is_file()
        })
        .collect();
    files.sort();
    if let Some(r) = recorded {
        files.retain(|p| p.file_stem().is_some_and(|s| s.to_string_lossy() == r));
    }
    let file = match files.as_slice() {
        [one] => one.clone(),
        [] => {
            return Err(Error::Format {
                path: dir.to_path_buf(),
                msg: format!("no modifier token file (<new1>.safetensors) beside {WEIGHTS_FILE}"),
            })
        }
        several => {
            return Err(Error::Unsupported(format!(
                "{}: {} modifier tokens ({}): concepts trained jointly are not supported, one \
                 modifier token per folder",
                dir.display(),
                several.len(),
                several
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )))
        }
    };
    let found = Found::read(&file).map_err(|e| match e {
        Error::Format { path, msg } => Error::Format {
            path,
            msg: format!("{msg} (a pickled .bin cannot be read: save it as safetensors)"),
        },
        e => e,
    })?;
    let tensors = found.tensors()?;
    let bad = |msg: String| found.error(msg);
    let (token, t) = match tensors.iter().next() {
        Some((k, t)) if tensors.len() == 1 => (k.clone(), t.clone()),
        _ => return Err(bad("a modifier token file holds one tensor".into())),
    };
    check_float(&token, &t, &bad)?;
    let t = t.to_dtype(DType::F32)?;
    let vector = match t.rank() {
        1 => t.unsqueeze(0)?,
        2 if t.dim(0)? == 1 => t,
        _ => {
            return Err(bad(format!(
                "`{token}` has shape {:?}: a modifier token is one vector",
                t.dims()
            )))
        }
    };
    Ok((token, vector))
}

/// A Custom Diffusion concept, as a session holds it.
#[derive(Debug, Clone)]
pub struct LayersConcept {
    pub name: String,
    pub word: String,
    /// The modifier token's name (`<new1>`).
    pub modifier: String,
    /// Its vector `[1, width]`.
    pub vector: Tensor,
    /// The trained projections by `LAYER.PART`.
    pub weights: BTreeMap<String, Tensor>,
    pub origin: Origin,
}

impl CustomConcept for LayersConcept {
    fn name(&self) -> &str {
        &self.name
    }

    fn word(&self) -> &str {
        &self.word
    }

    fn method(&self) -> &'static str {
        "custom_diffusion"
    }

    fn size_bytes(&self) -> usize {
        (self.vector.elem_count() + self.weights.values().map(Tensor::elem_count).sum::<usize>())
            * 4
    }

    fn summary(&self) -> String {
        let layers: HashSet<&str> = self
            .weights
            .keys()
            .filter_map(|k| k.rsplit_once(".to_").map(|(l, _)| l))
            .collect();
        format!(
            "Concept(<{}> = {} {}, custom_diffusion, {} layers)",
            self.name,
            self.modifier,
            self.word,
            layers.len()
        )
    }

    fn provenance(&self) -> Provenance {
        Provenance {
            method: Some(self.method().into()),
            name: Some(self.name.clone()),
            word: Some(self.word.clone()),
            trigger: Some(self.modifier.clone()),
            rank: None,
            base_model: self.origin.base_model.clone(),
            train_steps: self.origin.train_steps,
        }
    }

    fn saves_folder(&self) -> bool {
        true
    }

    /// The script's two files in the folder `dir`, and our record beside them.
    fn save(&self, dir: &Path, _: bool) -> Result<()> {
        super::files::check_out_folder(dir)?;
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let cpu = |t: &Tensor| -> Result<Tensor> {
            Ok(t.to_dtype(DType::F32)?
                .to_device(&Device::Cpu)?
                .contiguous()?)
        };
        let mut tensors = vec![];
        for (key, t) in &self.weights {
            let (layer, name) = split_key(key)?;
            tensors.push((format!("{layer}.processor.{name}"), cpu(t)?));
        }
        let pt = HashMap::from([("format".to_string(), "pt".to_string())]);
        write_safetensors(&dir.join(WEIGHTS_FILE), tensors, pt.clone())?;
        let token_file = dir.join(format!("{}.safetensors", self.modifier));
        write_safetensors(
            &token_file,
            vec![(self.modifier.clone(), cpu(&self.vector.squeeze(0)?)?)],
            pt,
        )?;
        self.provenance().write_to_folder(dir)
    }

    /// Every layer it adapts is a cross-attention layer of `sd` with the shapes of its own
    /// projections; the vector has the text encoder's width.
    fn check(&self, sd: &StableDiffusion, _: bool, job: &Job) -> Result<()> {
        self.origin.warn_other_model(&self.name, sd, job);
        let width = self.vector.dim(1)?;
        if width != sd.text_encoder.hidden_size() {
            return Err(Error::arg(
                "concept",
                format!(
                    "<{}>: the modifier token's vector has width {width}, the text encoder's \
                     {}",
                    self.name,
                    sd.text_encoder.hidden_size()
                ),
            ));
        }
        for (key, t) in &self.weights {
            let (layer, name) = split_key(key)?;
            let p = part(name).ok_or_else(|| Error::Internal(format!("part of `{key}`")))?;
            let attn = sd.unet.cross_attention(layer).ok_or_else(|| {
                Error::arg(
                    "concept",
                    format!("`{layer}` is not a cross-attention layer of this model"),
                )
            })?;
            let (w, b) = attn.projection(p.projection);
            let want = if p.bias {
                b.map(|b| b.dims().to_vec()).unwrap_or_default()
            } else {
                w.dims().to_vec()
            };
            if t.dims() != want.as_slice() {
                return Err(Error::arg(
                    "concept",
                    format!(
                        "`{key}` has shape {:?}, this model's projection {want:?} (a concept \
                         of another model?)",
                        t.dims()
                    ),
                ));
            }
        }
        Ok(())
    }

    fn renamed(&self, name: &str) -> ConceptRef {
        Arc::new(Self {
            name: name.to_string(),
            ..self.clone()
        })
    }

    fn change(&self) -> Change<'_> {
        Change {
            words: vec![
                Words::Vectors {
                    vectors: &self.vector,
                    stand_in: STAND_IN.to_string(),
                },
                Words::Text(self.word.clone()),
            ],
            residuals: None,
            hooks: Some(self),
            unet: None,
        }
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl HookMaker for LayersConcept {
    fn unet_hook(&self, sd: &StableDiffusion, branch: Branch) -> Result<Box<dyn AttentionHook>> {
        Ok(Box::new(ProjectionsHook::new(
            &self.weights,
            sd,
            Some(branch),
            false,
        )?))
    }

    fn text_hook(&self, _: &StableDiffusion) -> Result<Option<Box<dyn AttentionHook>>> {
        Ok(None)
    }
}

/// `LAYER.PART` split at the part's name.
fn split_key(key: &str) -> Result<(&str, &str)> {
    PARTS
        .iter()
        .find_map(|p| {
            key.strip_suffix(p.name)
                .and_then(|l| l.strip_suffix('.'))
                .map(|l| (l, p.name))
        })
        .ok_or_else(|| Error::Internal(format!("`{key}` is not LAYER.PART")))
}

/// The trained projections as a hook: in their layers, each replaces its projection's output
/// on the rows of `branch` (every row without one), by `input @ W^T (+ b)`; with `detach_bos`
/// (training) the first token's key and value carry no gradient, as the script's processor.
pub struct ProjectionsHook {
    /// `(layer, projection)` -> (`W^T`, bias).
    projections: HashMap<(String, Projection), (Tensor, Option<Tensor>)>,
    layers: HashSet<String>,
    branch: Option<Branch>,
    detach_bos: bool,
}

impl ProjectionsHook {
    pub fn new(
        weights: &BTreeMap<String, Tensor>,
        sd: &StableDiffusion,
        branch: Option<Branch>,
        detach_bos: bool,
    ) -> Result<Self> {
        let (dev, dt) = (sd.device(), sd.dtype());
        let mut matrices = HashMap::new();
        let mut biases = HashMap::new();
        for (key, t) in weights {
            let (layer, name) = split_key(key)?;
            let p = part(name).ok_or_else(|| Error::Internal(format!("part of `{key}`")))?;
            let t = t.to_device(dev)?.to_dtype(dt)?;
            let at = (layer.to_string(), p.projection);
            if p.bias {
                biases.insert(at, t);
            } else {
                matrices.insert(at, t.t()?);
            }
        }
        let projections: HashMap<(String, Projection), (Tensor, Option<Tensor>)> = matrices
            .into_iter()
            .map(|(at, wt)| {
                let b = biases.remove(&at);
                (at, (wt, b))
            })
            .collect();
        let layers = projections.keys().map(|(l, _)| l.clone()).collect();
        Ok(Self {
            projections,
            layers,
            branch,
            detach_bos,
        })
    }
}

impl AttentionHook for ProjectionsHook {
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
        let Some((wt, bias)) = self.projections.get(&(site.layer.path.clone(), projection)) else {
            return Ok(output);
        };
        let mut new = input.broadcast_matmul(wt)?;
        if let Some(b) = bias {
            new = new.broadcast_add(b)?;
        }
        let kv = matches!(projection, Projection::Key | Projection::Value);
        if self.detach_bos && kv && new.dim(1)? > 1 {
            let n = new.dim(1)?;
            new = Tensor::cat(
                &[new.narrow(1, 0, 1)?.detach(), new.narrow(1, 1, n - 1)?],
                1,
            )?;
        }
        on_branch(site, self.branch, output, new)
    }
}

/// Custom Diffusion's learner: the modifier token's vector (from the initializer entry's
/// embedding) and the trained projections of every cross-attention layer (from the model's
/// own).
pub struct ModifiedLayers {
    vars: BTreeMap<String, Var>,
    initial: BTreeMap<String, Tensor>,
    modifier: String,
    initializer: String,
    freeze: Freeze,
    /// Tokens of the stand-in text (replaced by the modifier's one vector).
    stand_in_tokens: usize,
}

impl ModifiedLayers {
    pub fn new(sd: &StableDiffusion, settings: &Settings) -> Result<Self> {
        let freeze = Freeze::parse(word(settings, "freeze_model")?)?;
        let modifier = word(settings, "modifier_token")?.to_string();
        let init = word(settings, "initializer_token")?;
        let id = sd.tokenizer.token_to_id(init).ok_or_else(|| {
            Error::arg(
                "initializer_token",
                format!("`{init}` is not one entry of the tokenizer's vocabulary"),
            )
        })?;
        let ids = Tensor::new(&[[id]], sd.device())?;
        let vector = sd
            .text_encoder
            .embed_tokens(&ids)?
            .squeeze(0)?
            .to_dtype(DType::F32)?
            .detach();
        let mut vars = BTreeMap::from([(TOKEN.to_string(), Var::from_tensor(&vector)?)]);
        for layer in sd.unet.cross_attention_layers() {
            let attn = sd
                .unet
                .attention(&layer.path)
                .ok_or_else(|| Error::Internal(format!("no layer `{}`", layer.path)))?;
            for p in freeze.parts() {
                let (w, b) = attn.projection(p.projection);
                let t = if p.bias {
                    b.ok_or_else(|| Error::Internal(format!("`{}` has no bias", layer.path)))?
                } else {
                    w
                };
                vars.insert(
                    format!("{}.{}", layer.path, p.name),
                    Var::from_tensor(&t.to_dtype(DType::F32)?.detach())?,
                );
            }
        }
        let initial = plain_values(&vars)?;
        let stand_in = sd.tokenize(STAND_IN)?;
        Ok(Self {
            vars,
            initial,
            modifier,
            initializer: init.to_string(),
            freeze,
            stand_in_tokens: stand_in.n_tokens - 2,
        })
    }

    /// What `vars` (a trainer's, of this learner, on `sd`) learned, as a concept.
    pub fn concept(
        sd: &StableDiffusion,
        vars: &BTreeMap<String, Var>,
        run: &Run<'_>,
        modifier: &str,
    ) -> Result<LayersConcept> {
        let mut weights: BTreeMap<String, Tensor> = plain_values(vars)?
            .into_iter()
            .map(|(k, v)| Ok((k, v.to_device(&Device::Cpu)?)))
            .collect::<Result<_>>()?;
        let vector = weights
            .remove(TOKEN)
            .ok_or_else(|| Error::Internal(format!("not a Custom Diffusion run (no `{TOKEN}`)")))?;
        Ok(LayersConcept {
            name: run.name.to_string(),
            word: run.word.to_string(),
            modifier: modifier.to_string(),
            vector,
            weights,
            origin: Origin::of_run(sd, run),
        })
    }
}

impl Learner for ModifiedLayers {
    fn method(&self) -> &'static str {
        "custom_diffusion"
    }

    /// The modifier token (its stand-in) before the class word.
    fn words(&self, word: &str) -> String {
        format!("{STAND_IN} {word}")
    }

    fn vars(&self) -> &BTreeMap<String, Var> {
        &self.vars
    }

    fn initial(&self) -> &BTreeMap<String, Tensor> {
        &self.initial
    }

    fn max_grad_norm(&self) -> Option<f64> {
        Some(1.0)
    }

    fn augment(&self) -> Augment {
        Augment::Scale
    }

    fn loss(
        &self,
        sd: &StableDiffusion,
        data: &TrainingSet,
        batch: &Batch,
        params: &BTreeMap<String, Tensor>,
    ) -> Result<Tensor> {
        let modifier = Embedding {
            token: self.modifier.clone(),
            vectors: params[TOKEN].clone(),
        };
        let states = data
            .prompt_tokens(batch)
            .into_iter()
            .map(|(tokens, pos)| {
                // The stand-in's tokens open the words' span.
                let span = pos[0]..pos[0] + self.stand_in_tokens;
                text_states(sd, tokens, span, &modifier)
            })
            .collect::<Result<Vec<_>>>()?;
        let weights: BTreeMap<String, Tensor> = params
            .iter()
            .filter(|(k, _)| k.as_str() != TOKEN)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let hook = ProjectionsHook::new(&weights, sd, None, true)?;
        ddpm_loss(
            sd,
            &sd.unet,
            data,
            batch,
            &Tensor::cat(&states, 0)?,
            Some(&hook),
        )
    }

    fn settings(&self) -> serde_json::Value {
        serde_json::json!({
            "freeze_model": match self.freeze {
                Freeze::CrossattnKv => "crossattn_kv",
                Freeze::Crossattn => "crossattn",
            },
            "modifier_token": self.modifier,
            "initializer_token": self.initializer,
        })
    }

    /// The script's two files in a folder.
    fn save(&self, sd: &StableDiffusion, run: &Run<'_>, dir: &Path, stem: &str) -> Result<PathBuf> {
        let path = dir.join(stem);
        Self::concept(sd, &self.vars, run, &self.modifier)?.save(&path, true)?;
        Ok(path)
    }

    fn read(
        &mut self,
        _: &StableDiffusion,
        path: &Path,
        _: &Job,
    ) -> Result<BTreeMap<String, Tensor>> {
        if !CustomDiffusion.claims(&Found::read(path)?) {
            return Err(not_a(path, "Custom Diffusion folder"));
        }
        let mut params = read_weights(path)?;
        let (_, vector) = read_modifier(path, Some(&self.modifier))?;
        params.insert(TOKEN.to_string(), vector);
        Ok(params)
    }
}
