//! The customization methods behind one seam: Infusion (the paper's, whose mechanics live in
//! [`crate::infusion`]) and the paper's baselines. Each method is one file here:
//!
//! - a [`Method`] says its name, its own options with their defaults, its training defaults,
//!   makes its learner (the [`crate::train::Learner`] the shared trainer runs), turns what a run
//!   reached into a concept, and recognises and reads its files;
//! - its concepts are [`CustomConcept`]s: one handle ([`ConceptRef`]) from training or loading to
//!   generation, the metrics and saving, which says how the concept changes C ([`Change`]).
//!
//! [`REGISTRY`] lists the methods: `--method` values, `:help`, option checks, loading, `bench`
//! and the metrics read it. Adding a method is one new file and one line there. The methods use
//! the SD layer's seams (the text encoder's token embeddings and module hook, the attention
//! hook, the UNet's weights); F beside C is put together one room up, in
//! [`crate::customize`].

pub(crate) mod common;
pub(crate) mod custom_diffusion;
pub(crate) mod dreambooth;
pub(crate) mod files;
pub(crate) mod infusion;
pub(crate) mod lora;
pub(crate) mod perfusion;
pub(crate) mod textual_inversion;
pub(crate) mod words;

// What the tests, the binary and a library user reach (the files are the crate's own).
pub use custom_diffusion::ProjectionsHook;
pub use dreambooth::FullUnet;
pub use lora::{
    read_lora, LoraConcept, LoraFile, LoraHook, LoraLayer, LoraLayout, LoraLearner, LoraTarget,
};
pub use perfusion::{captions, covariance_of, Gate, RankOneHook, Target, BUILTIN_CAPTIONS};
pub use textual_inversion::{read_embedding, LearnedWord, WordConcept};
pub use words::{text_states, Embedding};

use std::any::Any;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::job::Job;
use crate::sd::hook::{AttentionHook, Branch};
use crate::sd::pipeline::StableDiffusion;
use crate::sd::unet::UNet;
use crate::train::{Learner, Trainer};
pub use files::{Found, Provenance};

/// Every method, in the order files are offered to them (the first that claims a file reads
/// it).
pub static REGISTRY: [&dyn Method; 6] = [
    &infusion::Infusion,
    &textual_inversion::TextualInversion,
    &lora::Lora,
    &custom_diffusion::CustomDiffusion,
    &perfusion::Perfusion,
    &dreambooth::DreamBooth,
];

/// The method called `name`; an unknown name is an error listing the methods.
pub fn method(name: &str) -> Result<&'static dyn Method> {
    REGISTRY
        .iter()
        .copied()
        .find(|m| m.name() == name)
        .ok_or_else(|| {
            Error::arg(
                "method",
                format!("unknown method `{name}` (methods: {})", names().join(", ")),
            )
        })
}

/// The methods' names, as `method` options take them.
pub fn names() -> Vec<&'static str> {
    REGISTRY.iter().map(|m| m.name()).collect()
}

/// [`names`], for what needs them for the whole run (option checks).
pub fn names_static() -> &'static [&'static str] {
    static NAMES: std::sync::OnceLock<Vec<&'static str>> = std::sync::OnceLock::new();
    NAMES.get_or_init(names).as_slice()
}

/// The method trained by default: the paper's.
pub fn default_method() -> &'static dyn Method {
    &infusion::Infusion
}

/// A method's own option (beyond what every method has: steps, learning rate, batch, seed,
/// templates, flips, prior preservation where it takes it).
#[derive(Debug, Clone, Copy)]
pub struct Setting {
    pub name: &'static str,
    pub doc: &'static str,
    pub default: SettingValue,
}

/// A setting's value type and default.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SettingValue {
    /// A whole number of at least 1.
    Count(usize),
    /// One word.
    Word(&'static str),
    /// A finite number.
    Number(f64),
}

/// Settings given for a method, by name: what its learner is made with, and what checkpoints
/// keep. Only the method's own [`Setting`]s are accepted.
pub type Settings = BTreeMap<String, serde_json::Value>;

/// A method: what it trains, how, and what it reads and writes.
pub trait Method: Send + Sync {
    /// `infusion`, `textual_inversion`, `lora`, `dreambooth`.
    fn name(&self) -> &'static str;

    /// One line: what it learns, after which script or paper.
    fn about(&self) -> &'static str;

    /// Its own options, with their defaults.
    fn settings(&self) -> &'static [Setting] {
        &[]
    }

    /// Training steps by default.
    fn default_steps(&self) -> usize;

    /// Images a step by default.
    fn default_batch(&self) -> usize {
        crate::train::TrainOptions::default().batch
    }

    /// The learning rate by default for `batch` images a step, with or without prior
    /// preservation.
    fn default_lr(&self, batch: usize, prior: bool) -> f64;

    /// Whether it trains with prior preservation when asked (class images of the plain model).
    fn takes_prior(&self) -> bool {
        false
    }

    /// Whether its concepts are saved as a folder (a UNet) rather than one file.
    fn saves_folder(&self) -> bool {
        false
    }

    /// Where a run saves its concept when no output is given.
    fn default_out(&self, name: &str) -> PathBuf {
        if self.saves_folder() {
            PathBuf::from(format!("{name}-unet"))
        } else {
            PathBuf::from(format!("{name}.safetensors"))
        }
    }

    /// What trains it from scratch on `sd` (`word`: the class word; `seed`: of every random
    /// initialisation).
    fn learner<'a>(
        &self,
        sd: &'a StableDiffusion,
        settings: &Settings,
        word: &str,
        seed: u64,
    ) -> Result<Box<dyn Learner + 'a>>;

    /// The concept a run of its learner reached so far (plain values, never the trainer's
    /// variables: see [`crate::util::tensors::plain`]).
    fn reached(&self, trainer: &Trainer<'_>, settings: &Settings) -> Result<ConceptRef>;

    /// Whether `found` (a file's header, or a folder) is one of its files.
    fn claims(&self, found: &Found) -> bool;

    /// Reads its file or folder `found` as a concept, with what `req` gives in place of what the
    /// file does not record; checked against `sd` when there is one.
    fn load(
        &self,
        found: &Found,
        req: &ConceptRequest,
        sd: Option<&StableDiffusion>,
        job: &Job,
    ) -> Result<ConceptRef>;
}

impl std::fmt::Debug for dyn Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl PartialEq for dyn Method {
    fn eq(&self, other: &Self) -> bool {
        self.name() == other.name()
    }
}

/// The settings `given` for `method`, checked (each a setting of the method, of the setting's
/// type) and completed with the defaults.
pub fn resolve_settings(method: &dyn Method, given: &Settings) -> Result<Settings> {
    let specs = method.settings();
    if let Some(k) = given.keys().find(|k| !specs.iter().any(|s| s.name == *k)) {
        let known: Vec<&str> = specs.iter().map(|s| s.name).collect();
        return Err(Error::arg(
            k,
            format!(
                "{} has no option `{k}` ({})",
                method.name(),
                if known.is_empty() {
                    "it has none of its own".to_string()
                } else {
                    format!("its own: {}", known.join(", "))
                }
            ),
        ));
    }
    let mut out = Settings::new();
    for s in specs {
        let value = match (given.get(s.name), s.default) {
            (None, SettingValue::Count(d)) => serde_json::json!(d),
            (None, SettingValue::Word(d)) => serde_json::json!(d),
            (None, SettingValue::Number(d)) => serde_json::json!(d),
            (Some(v), SettingValue::Number(_)) => match v.as_f64() {
                Some(x) if x.is_finite() => serde_json::json!(x),
                _ => return Err(Error::arg(s.name, format!("{v} is not a finite number"))),
            },
            (Some(v), SettingValue::Count(_)) => match v.as_u64() {
                Some(n) if n >= 1 => v.clone(),
                _ => {
                    return Err(Error::arg(
                        s.name,
                        format!("{v} is not a count (1 or more)"),
                    ))
                }
            },
            (Some(v), SettingValue::Word(_)) => match v.as_str() {
                Some(w) if !w.trim().is_empty() && !w.contains(char::is_whitespace) => v.clone(),
                _ => return Err(Error::arg(s.name, format!("{v} is not one word"))),
            },
        };
        out.insert(s.name.to_string(), value);
    }
    Ok(out)
}

/// A count setting of resolved `settings` (see [`resolve_settings`]).
pub fn count(settings: &Settings, name: &str) -> Result<usize> {
    settings
        .get(name)
        .and_then(|v| v.as_u64())
        .map(|n| n as usize)
        .ok_or_else(|| Error::Internal(format!("setting `{name}` was not resolved")))
}

/// A number setting of resolved `settings` (see [`resolve_settings`]).
pub fn number(settings: &Settings, name: &str) -> Result<f64> {
    settings
        .get(name)
        .and_then(|v| v.as_f64())
        .ok_or_else(|| Error::Internal(format!("setting `{name}` was not resolved")))
}

/// A word setting of resolved `settings` (see [`resolve_settings`]).
pub fn word<'a>(settings: &'a Settings, name: &str) -> Result<&'a str> {
    settings
        .get(name)
        .and_then(|v| v.as_str())
        .ok_or_else(|| Error::Internal(format!("setting `{name}` was not resolved")))
}

/// How to take a concept file in: what the file cannot say itself.
#[derive(Debug, Clone, Default)]
pub struct ConceptRequest {
    pub path: PathBuf,
    /// What prompts call it; by default the name the file records, else TI's token without
    /// `<>`, a LoRA's file stem, a DreamBooth folder's name, an Infusion concept's own.
    pub name: Option<String>,
    /// The class word F sees (needed for files that do not record theirs; Infusion files
    /// carry theirs).
    pub word: Option<String>,
    /// A LoRA's strength (1.0).
    pub scale: Option<f64>,
    /// The identifier C's prompt puts before the word (a LoRA's or DreamBooth's "sks").
    pub trigger: Option<String>,
    /// Use a concept trained on another model (Infusion refuses one otherwise).
    pub force: bool,
    /// Perfusion's gate at generation, in place of the file's (threshold, temperature).
    pub beta: Option<f64>,
    pub tau: Option<f64>,
}

impl ConceptRequest {
    /// Refuses what `method`'s files have no use for (`given`: the fields it takes).
    pub fn refuse_others(&self, method: &str, takes: &[&str]) -> Result<()> {
        let asked = [
            ("word", self.word.is_some()),
            ("scale", self.scale.is_some()),
            ("trigger", self.trigger.is_some()),
            ("beta", self.beta.is_some()),
            ("tau", self.tau.is_some()),
        ];
        match asked.iter().find(|(k, given)| *given && !takes.contains(k)) {
            Some((k, _)) => Err(Error::arg(
                k,
                format!(
                    "{}: a {method} concept has no {k}{}",
                    self.path.display(),
                    if *k == "word" {
                        " to give (it carries its own)"
                    } else {
                        ""
                    }
                ),
            )),
            None => Ok(()),
        }
    }
}

/// Reads the concept file or folder `req.path` as whichever method's it is.
pub fn load(req: &ConceptRequest, sd: Option<&StableDiffusion>, job: &Job) -> Result<ConceptRef> {
    let found = Found::read(&req.path)?;
    let method = REGISTRY
        .iter()
        .find(|m| m.claims(&found))
        .ok_or_else(|| found.unclaimed())?;
    method.load(&found, req, sd, job)
}

/// A learned concept of any method, from training or a file, as a session holds it.
pub trait CustomConcept: Send + Sync + std::fmt::Debug {
    /// What prompts call it: `<name>`.
    fn name(&self) -> &str;

    /// The class word F sees in its place.
    fn word(&self) -> &str;

    /// Its method's name.
    fn method(&self) -> &'static str;

    /// Bytes of what it learned (f32).
    fn size_bytes(&self) -> usize;

    /// One line, as scripts print it: `Concept(<pot> = sks teapot, lora, 16 layers, scale 1)`.
    fn summary(&self) -> String;

    /// What its files record of it.
    fn provenance(&self) -> Provenance;

    /// Whether it is saved as a folder (a UNet) rather than one file.
    fn saves_folder(&self) -> bool {
        false
    }

    /// Writes it in its method's layout at `path`, atomically (`f32`: full precision where the
    /// format has a choice).
    fn save(&self, path: &Path, f32: bool) -> Result<()>;

    /// Checks it against `sd` (layers, widths, the base model; `forced`: use it on another
    /// model anyway); warnings go to `job`.
    fn check(&self, sd: &StableDiffusion, forced: bool, job: &Job) -> Result<()>;

    /// Its strength, where it has one (a LoRA's scale).
    fn scale(&self) -> Option<f64> {
        None
    }

    /// The same concept under another name.
    fn renamed(&self, name: &str) -> ConceptRef;

    /// What it changes in C.
    fn change(&self) -> Change<'_>;

    /// The concept itself, for what only its method has (Infusion's Δs and settings).
    fn as_any(&self) -> &dyn Any;
}

/// One handle to a concept of any method, cheap to clone.
pub type ConceptRef = Arc<dyn CustomConcept>;

/// What C's prompt holds in place of a concept's class word.
#[derive(Debug, Clone)]
pub enum Words<'a> {
    Text(String),
    /// Learned token embeddings `[n, width]` in the place of the tokens of `stand_in`, the text
    /// tokenized in their place.
    Vectors {
        vectors: &'a Tensor,
        stand_in: String,
    },
}

/// Makes a concept's hooks for a model: on C's UNet rows (`branch`), and on the text encoder
/// when it changes C's text.
pub trait HookMaker: Send + Sync {
    fn unet_hook(&self, sd: &StableDiffusion, branch: Branch) -> Result<Box<dyn AttentionHook>>;

    /// A hook whose module part ([`AttentionHook::modules`]) changes the text encoder (C's
    /// text, its negative prompt's too), if it does.
    fn text_hook(&self, sd: &StableDiffusion) -> Result<Option<Box<dyn AttentionHook>>>;

    /// Whether the hooks of a prompt's concepts of this method are made together, as one
    /// ([`HookMaker::joint_unet_hook`]; Perfusion's edits are orthogonalised jointly).
    fn joint(&self) -> bool {
        false
    }

    /// The one hook of `peers` (the prompt's concepts of this method, this one first), on C's
    /// rows `branch`; `base` is F's prompt (the class words in the concepts' places).
    fn joint_unet_hook(
        &self,
        peers: &[&dyn CustomConcept],
        sd: &StableDiffusion,
        branch: Branch,
        base: &str,
    ) -> Result<Box<dyn AttentionHook>> {
        let _ = (peers, base);
        self.unet_hook(sd, branch)
    }
}

/// What a concept changes in C; F always runs the plain model on the prompt with the class
/// word.
pub struct Change<'a> {
    /// What C's prompt holds in place of the class word (the word itself when empty).
    pub words: Vec<Words<'a>>,
    /// Infusion: a Δ per cross-attention layer added to the values of the word's tokens, with
    /// F's attention probabilities in C (C's text must then be F's).
    pub residuals: Option<&'a BTreeMap<String, Tensor>>,
    /// Hooks on C's rows (a LoRA's).
    pub hooks: Option<&'a dyn HookMaker>,
    /// Another UNet for C (DreamBooth's).
    pub unet: Option<&'a Arc<UNet>>,
}

impl Change<'_> {
    /// A change of nothing but `words`.
    pub fn words(words: Vec<Words<'_>>) -> Change<'_> {
        Change {
            words,
            residuals: None,
            hooks: None,
            unet: None,
        }
    }
}
