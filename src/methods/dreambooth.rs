//! DreamBooth (Ruiz et al.; diffusers' `examples/dreambooth/train_dreambooth.py`): the whole UNet
//! trained (a trainable copy; the model's own stays as it is), prompts saying `trigger word`,
//! with prior preservation when asked. C runs the fine-tuned UNet; F the model's own.
//!
//! Files: a diffusers `unet/` folder (`config.json`, `diffusion_pytorch_model.safetensors`),
//! which `UNet2DConditionModel.from_pretrained` reads, and beside them `infusion_concept.json`
//! ([`Provenance`]).

use std::any::Any;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Tensor, Var};

use super::common::{check_trigger, ddpm_loss, name_and_word, not_a, Origin};
use super::files::{write_unet_folder, Found, Provenance, DREAMBOOTH_PROVENANCE};
use super::lora::DEFAULT_TRIGGER;
use super::{
    word, Change, ConceptRef, ConceptRequest, CustomConcept, Method, Setting, SettingValue,
    Settings, Words,
};
use crate::error::{Error, Result};
use crate::job::Job;
use crate::sd::pipeline::StableDiffusion;
use crate::sd::unet::UNet;
use crate::train::{Batch, Learner, Run, Trainer, TrainingSet};

/// The method.
pub struct DreamBooth;

const SETTINGS: [Setting; 1] = [Setting {
    name: "trigger",
    doc: "the identifier prompts put before the class word",
    default: SettingValue::Word(DEFAULT_TRIGGER),
}];

/// The stem of a diffusers UNet's weight files.
const WEIGHTS_STEM: &str = "diffusion_pytorch_model";

impl Method for DreamBooth {
    fn name(&self) -> &'static str {
        "dreambooth"
    }

    fn about(&self) -> &'static str {
        "the whole UNet, written as a diffusers unet/ folder (diffusers' train_dreambooth.py)"
    }

    fn settings(&self) -> &'static [Setting] {
        &SETTINGS
    }

    fn default_steps(&self) -> usize {
        500
    }

    fn default_lr(&self, _: usize, _: bool) -> f64 {
        5e-6
    }

    fn takes_prior(&self) -> bool {
        true
    }

    fn saves_folder(&self) -> bool {
        true
    }

    fn learner<'a>(
        &self,
        sd: &'a StableDiffusion,
        settings: &Settings,
        _: &str,
        _: u64,
    ) -> Result<Box<dyn Learner + 'a>> {
        Ok(Box::new(FullUnet::new(sd, word(settings, "trigger")?)?))
    }

    fn reached(&self, trainer: &Trainer<'_>, settings: &Settings) -> Result<ConceptRef> {
        Ok(Arc::new(FullUnet::concept(
            trainer.model(),
            trainer.vars(),
            &trainer.run_info(),
            word(settings, "trigger")?,
        )?))
    }

    /// A folder with a diffusers UNet's weights.
    fn claims(&self, found: &Found) -> bool {
        matches!(found, Found::Folder(dir)
            if crate::sd::hub::find_weights(dir, WEIGHTS_STEM, false).is_ok())
    }

    /// A diffusers `unet/` folder of the model's config, C's UNet where the concept is named
    /// (its prompt saying `trigger word`); it loads onto a model.
    fn load(
        &self,
        found: &Found,
        req: &ConceptRequest,
        sd: Option<&StableDiffusion>,
        job: &Job,
    ) -> Result<ConceptRef> {
        let path = found.path();
        if req.scale.is_some() {
            return Err(Error::arg(
                "scale",
                format!(
                    "{}: a DreamBooth UNet has no strength (it replaces C's UNet whole)",
                    path.display()
                ),
            ));
        }
        let sd = sd.ok_or_else(|| {
            Error::arg(
                "model",
                format!(
                    "{}: a UNet folder loads onto a model: load the model first",
                    path.display()
                ),
            )
        })?;
        let weights = crate::sd::hub::find_weights(path, WEIGHTS_STEM, sd.dtype() == DType::F16)?;
        let recorded = found.provenance()?;
        let unet = sd.unet_from_files(&weights)?;
        let folder = path
            .file_name()
            .map_or_else(String::new, |s| s.to_string_lossy().into_owned());
        let default_name = recorded.name.clone().unwrap_or(folder);
        let (name, word) = name_and_word(req, default_name, recorded.word.as_deref())?;
        let trigger = req
            .trigger
            .clone()
            .or(recorded.trigger.clone())
            .unwrap_or_else(|| DEFAULT_TRIGGER.into());
        check_trigger(&trigger)?;
        let concept = UnetConcept {
            name,
            word,
            trigger,
            unet: Arc::new(unet),
            n_params: sd.unet_parameters()?,
            dir: Some(path.to_path_buf()),
            weights: None,
            origin: Origin::recorded(&recorded),
        };
        concept.check(sd, false, job)?;
        Ok(Arc::new(concept))
    }
}

/// A fine-tuned copy of the model's UNet, as a session holds it.
#[derive(Clone)]
pub struct UnetConcept {
    pub name: String,
    pub word: String,
    /// C's prompt says `trigger word`.
    pub trigger: String,
    pub unet: Arc<UNet>,
    /// Its parameters.
    pub n_params: usize,
    /// The `unet/` folder it was read from or saved in.
    pub dir: Option<PathBuf>,
    /// Its weights by name, when trained in the session (plain values, shared with `unet`'s),
    /// so that it can be saved; `None` when read from `dir`.
    pub weights: Option<Arc<BTreeMap<String, Tensor>>>,
    pub origin: Origin,
}

impl std::fmt::Debug for UnetConcept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "UnetConcept(<{}>, {} parameters, {:?})",
            self.name, self.n_params, self.dir
        )
    }
}

impl CustomConcept for UnetConcept {
    fn name(&self) -> &str {
        &self.name
    }

    fn word(&self) -> &str {
        &self.word
    }

    fn method(&self) -> &'static str {
        "dreambooth"
    }

    fn size_bytes(&self) -> usize {
        self.n_params * 4
    }

    fn summary(&self) -> String {
        format!(
            "Concept(<{}> = {} {}, dreambooth, {} parameters)",
            self.name, self.trigger, self.word, self.n_params
        )
    }

    fn provenance(&self) -> Provenance {
        Provenance {
            method: Some(self.method().into()),
            name: Some(self.name.clone()),
            word: Some(self.word.clone()),
            trigger: Some(self.trigger.clone()),
            rank: None,
            base_model: self.origin.base_model.clone(),
            train_steps: self.origin.train_steps,
        }
    }

    fn saves_folder(&self) -> bool {
        true
    }

    /// A `unet/` folder at `dir`: written from the session's weights, or copied from the folder
    /// it was read from.
    fn save(&self, dir: &Path, _: bool) -> Result<()> {
        let provenance = self.provenance();
        if let Some(weights) = &self.weights {
            return write_unet_folder(dir, weights.iter(), self.unet.config(), &provenance);
        }
        let Some(from) = &self.dir else {
            return Err(Error::Internal(format!(
                "<{}>: a DreamBooth UNet with neither weights nor a folder",
                self.name
            )));
        };
        if from.canonicalize().ok() == dir.canonicalize().ok() {
            // Saved where it was read from: only the record changes.
            return provenance.write_to_folder(dir);
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        // Every file of the folder (config, weights in whatever variant or shards it has).
        let entries = std::fs::read_dir(from).map_err(|e| Error::io(from, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(from, e))?;
            let src = entry.path();
            if !src.is_file() || entry.file_name() == DREAMBOOTH_PROVENANCE {
                continue;
            }
            let dst = dir.join(entry.file_name());
            let mut input = std::fs::File::open(&src).map_err(|e| Error::io(&src, e))?;
            crate::util::fs::write_atomic(&dst, |w| {
                std::io::copy(&mut input, w)
                    .map(|_| ())
                    .map_err(|e| Error::io(&src, e))
            })?;
        }
        provenance.write_to_folder(dir)
    }

    fn check(&self, sd: &StableDiffusion, _: bool, job: &Job) -> Result<()> {
        self.origin.warn_other_model(&self.name, sd, job);
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
            words: vec![Words::Text(format!("{} {}", self.trigger, self.word))],
            residuals: None,
            hooks: None,
            unet: Some(&self.unet),
        }
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// DreamBooth: the whole UNet trained (a trainable copy; the model's own stays as it is),
/// prompts saying `trigger word`.
pub struct FullUnet {
    trigger: String,
    unet: crate::sd::unet::UNet,
    vars: BTreeMap<String, Var>,
    /// Empty: "before training" is the model's own UNet.
    initial: BTreeMap<String, Tensor>,
}

impl FullUnet {
    pub fn new(sd: &StableDiffusion, trigger: &str) -> Result<Self> {
        check_trigger(trigger)?;
        let (unet, vars) = sd.trainable_unet()?;
        Ok(Self {
            trigger: trigger.to_string(),
            unet,
            vars: vars.into_iter().collect(),
            initial: BTreeMap::new(),
        })
    }

    /// The UNet in `vars` (a trainer's, of this learner, on `sd`) as a concept: its plain
    /// values, detached, not copied (the trainer ends with the run, and a UNet is large).
    pub fn concept(
        sd: &StableDiffusion,
        vars: &BTreeMap<String, Var>,
        run: &Run<'_>,
        trigger: &str,
    ) -> Result<UnetConcept> {
        let weights: BTreeMap<String, Tensor> = vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
            .collect();
        let n_params = weights.values().map(|t| t.elem_count()).sum();
        let unet = sd.unet_from_tensors(
            weights
                .iter()
                .map(|(k, t)| (k.clone(), t.clone()))
                .collect(),
        )?;
        Ok(UnetConcept {
            name: run.name.to_string(),
            word: run.word.to_string(),
            trigger: trigger.to_string(),
            unet: Arc::new(unet),
            n_params,
            dir: None,
            weights: Some(Arc::new(weights)),
            origin: Origin::of_run(sd, run),
        })
    }
}

impl Learner for FullUnet {
    fn method(&self) -> &'static str {
        "dreambooth"
    }

    fn words(&self, word: &str) -> String {
        format!("{} {word}", self.trigger)
    }

    /// Every weight trains, so the layers keep what the frozen UNet's fused ops drop: one
    /// pass of one SD1.5 row peaked 13.1 GB above the loaded models (3.4 GB of it the
    /// gradients) against the 2.1 GB counted for a frozen UNet (notes/cpu.md, "DreamBooth on
    /// SD1.5 does not fit 23 GiB").
    fn activation_factor(&self) -> f64 {
        4.5
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
        let (states, _) = data.prompts(sd, batch)?;
        // The parameters live in the trainable UNet; none given means the model's own.
        let unet = if params.is_empty() {
            &sd.unet
        } else {
            &self.unet
        };
        ddpm_loss(sd, unet, data, batch, &states, None)
    }

    fn settings(&self) -> serde_json::Value {
        serde_json::json!({ "trigger": self.trigger })
    }

    /// A diffusers `unet/` folder ([`write_unet_folder`]).
    fn save(&self, sd: &StableDiffusion, run: &Run<'_>, dir: &Path, stem: &str) -> Result<PathBuf> {
        let path = dir.join(stem);
        Self::concept(sd, &self.vars, run, &self.trigger)?.save(&path, true)?;
        Ok(path)
    }

    fn read(
        &mut self,
        sd: &StableDiffusion,
        path: &Path,
        _: &Job,
    ) -> Result<BTreeMap<String, Tensor>> {
        if !path.is_dir() {
            return Err(not_a(path, "unet/ folder"));
        }
        let weights = crate::sd::hub::find_weights(path, WEIGHTS_STEM, false)?;
        let mut params = BTreeMap::new();
        for file in weights {
            let tensors = candle_core::safetensors::load(&file, sd.device()).map_err(|e| {
                Error::Safetensors {
                    path: file.clone(),
                    msg: crate::error::root_cause(&e),
                }
            })?;
            params.extend(tensors);
        }
        Ok(params)
    }
}
