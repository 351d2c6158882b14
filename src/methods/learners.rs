//! Training Textual Inversion and DreamBooth-LoRA through the shared trainer ([`Learner`]), as
//! diffusers' scripts train them (examples/textual_inversion/textual_inversion.py,
//! examples/dreambooth/train_dreambooth_lora.py): the DDPM loss of the plain model with the
//! learned word, or with the LoRA on every attention projection; nothing else is trained.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor, Var};
use rand::SeedableRng;

use super::adapted::{Adapted, Change, Origin};
use super::files::{
    read, write_unet_folder, ConceptFile, Embedding, Lora, LoraLayer, LoraLayout, LoraTarget,
    Provenance,
};
use super::lora::LoraHook;
use super::textual_inversion::text_states;
use crate::error::{Error, Result};
use crate::job::Job;
use crate::sd::hook::{BatchLayout, Branch, Guidance, HookCtx};
use crate::sd::pipeline::StableDiffusion;
use crate::train::{Batch, Learner, Run, TrainingSet};
use crate::util::tensors::{plain, plain_values};

/// The DDPM loss of `batch` with text states `states` `(b, tokens, width)` and an optional hook
/// on every row, through `sd`'s UNet.
fn ddpm_loss(
    sd: &StableDiffusion,
    data: &TrainingSet,
    batch: &Batch,
    states: &Tensor,
    hook: Option<&dyn crate::sd::hook::AttentionHook>,
) -> Result<Tensor> {
    ddpm_loss_with(sd, &sd.unet, data, batch, states, hook)
}

/// [`ddpm_loss`] through `unet`.
fn ddpm_loss_with(
    sd: &StableDiffusion,
    unet: &crate::sd::unet::UNet,
    data: &TrainingSet,
    batch: &Batch,
    states: &Tensor,
    hook: Option<&dyn crate::sd::hook::AttentionHook>,
) -> Result<Tensor> {
    let z0 = data.latents(sd, batch)?;
    let ts: Vec<usize> = batch.draws.iter().map(|d| d.timestep).collect();
    let z_t = sd.scheduler.add_noise(&z0, &batch.noise, &ts)?;
    let t = Tensor::new(
        ts.iter().map(|&t| t as f32).collect::<Vec<_>>(),
        sd.device(),
    )?;
    let rows = BatchLayout::uniform(batch.len(), Branch(1), Guidance::Conditional);
    let ctx = hook.map(|hook| HookCtx {
        hook,
        rows: &rows,
        step: None,
    });
    let pred = unet.forward(
        &z_t.to_dtype(sd.dtype())?,
        &t,
        &states.to_dtype(sd.dtype())?,
        ctx.as_ref(),
    )?;
    Ok(
        (pred.to_dtype(DType::F32)? - batch.noise.to_dtype(DType::F32)?)?
            .sqr()?
            .mean_all()?,
    )
}

/// Textual Inversion: the vectors of a new word, initialised from the class word's token
/// embeddings (one vector per token of the word, as the script's initializer token).
pub struct LearnedWord {
    vars: BTreeMap<String, Var>,
    initial: BTreeMap<String, Tensor>,
}

const VECTORS: &str = "vectors";

impl LearnedWord {
    pub fn new(sd: &StableDiffusion, word: &str) -> Result<Self> {
        let tokens = sd.tokenize(word)?;
        let ids: Vec<u32> = tokens.ids[1..tokens.n_tokens - 1].to_vec();
        if ids.is_empty() {
            return Err(Error::arg("word", format!("{word:?} has no tokens")));
        }
        let n = ids.len();
        let ids = Tensor::from_vec(ids, (1, n), sd.device())?;
        let init = sd
            .text_encoder
            .embed_tokens(&ids)?
            .squeeze(0)?
            .to_dtype(DType::F32)?
            .detach();
        let var = Var::from_tensor(&init)?;
        Ok(Self {
            vars: BTreeMap::from([(VECTORS.to_string(), var)]),
            initial: BTreeMap::from([(VECTORS.to_string(), init)]),
        })
    }

    /// The word learned in `vars` (a trainer's, of this learner, on `sd`), as a concept of
    /// the session.
    pub fn export(
        sd: &StableDiffusion,
        vars: &BTreeMap<String, Var>,
        run: &Run<'_>,
    ) -> Result<Adapted> {
        let v = vars
            .get(VECTORS)
            .ok_or_else(|| Error::arg("method", "not a Textual Inversion run"))?;
        Ok(Adapted {
            name: run.name.to_string(),
            word: run.word.to_string(),
            change: Change::TextualInversion(Embedding {
                token: format!("<{}>", run.name),
                vectors: plain(v.as_tensor())?.to_device(&candle_core::Device::Cpu)?,
            }),
            origin: origin(sd, run),
        })
    }
}

impl Learner for LearnedWord {
    fn method(&self) -> &'static str {
        "textual_inversion"
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
        let e = Embedding {
            token: "learned".into(),
            vectors: params[VECTORS].clone(),
        };
        let states = data
            .prompt_tokens(batch)
            .into_iter()
            .map(|(tokens, pos)| {
                let span = pos[0]..pos[pos.len() - 1] + 1;
                text_states(sd, tokens, span, &e)
            })
            .collect::<Result<Vec<_>>>()?;
        ddpm_loss(sd, data, batch, &Tensor::cat(&states, 0)?, None)
    }

    /// diffusers' `learned_embeds.safetensors` layout.
    fn save(&self, sd: &StableDiffusion, run: &Run<'_>, dir: &Path, stem: &str) -> Result<PathBuf> {
        let path = dir.join(format!("{stem}.safetensors"));
        Self::export(sd, &self.vars, run)?.save(&path)?;
        Ok(path)
    }

    fn read(&self, _: &StableDiffusion, path: &Path, _: &Job) -> Result<BTreeMap<String, Tensor>> {
        match read(path)? {
            ConceptFile::TextualInversion(e) => {
                Ok(BTreeMap::from([(VECTORS.to_string(), e.vectors)]))
            }
            _ => Err(not_a(path, "Textual Inversion embedding")),
        }
    }
}

/// Where a run's concept comes from: `sd`'s UNet, `run.steps` steps.
pub fn origin(sd: &StableDiffusion, run: &Run<'_>) -> Origin {
    Origin {
        base_model: Some(sd.unet_fingerprint().to_string()),
        train_steps: Some(run.steps),
    }
}

/// The error of a checkpoint file of another method.
fn not_a(path: &Path, what: &str) -> Error {
    Error::arg(
        "checkpoint",
        format!(
            "{}: not a {what} (another method's checkpoint?)",
            path.display()
        ),
    )
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
        let targets = super::lora::targets(sd)?;
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

    fn lora(params: &BTreeMap<String, Tensor>) -> Lora {
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
        Lora {
            layout: LoraLayout::Diffusers,
            layers,
        }
    }

    /// The LoRA learned in `vars` (a trainer's, of this learner, on `sd`), as a concept of the
    /// session (strength 1, `trigger` before its word).
    pub fn export(
        sd: &StableDiffusion,
        vars: &BTreeMap<String, Var>,
        run: &Run<'_>,
        trigger: &str,
    ) -> Result<Adapted> {
        let params: BTreeMap<String, Tensor> = plain_values(vars)?
            .into_iter()
            .map(|(k, v)| Ok((k, v.to_device(&candle_core::Device::Cpu)?)))
            .collect::<Result<_>>()?;
        Ok(Adapted {
            name: run.name.to_string(),
            word: run.word.to_string(),
            change: Change::Lora {
                lora: Self::lora(&params),
                scale: 1.0,
                trigger: Some(trigger.to_string()),
            },
            origin: origin(sd, run),
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
        ddpm_loss(sd, data, batch, &states, Some(&hook))
    }

    fn settings(&self) -> serde_json::Value {
        serde_json::json!({ "rank": self.rank, "trigger": self.trigger })
    }

    /// The layout diffusers' `save_lora_weights` writes.
    fn save(&self, sd: &StableDiffusion, run: &Run<'_>, dir: &Path, stem: &str) -> Result<PathBuf> {
        let path = dir.join(format!("{stem}.safetensors"));
        Self::export(sd, &self.vars, run, &self.trigger)?.save(&path)?;
        Ok(path)
    }

    fn read(&self, _: &StableDiffusion, path: &Path, _: &Job) -> Result<BTreeMap<String, Tensor>> {
        let ConceptFile::Lora(lora) = read(path)? else {
            return Err(not_a(path, "LoRA"));
        };
        let mut params = BTreeMap::new();
        for l in lora.layers {
            params.insert(format!("{}.lora.down.weight", l.module), l.down);
            params.insert(format!("{}.lora.up.weight", l.module), l.up);
        }
        Ok(params)
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

    /// Writes the UNet in `vars` (a trainer's, of this learner, on `sd`) as a diffusers `unet/`
    /// folder ([`write_unet_folder`]), recording the run.
    pub fn write(
        sd: &StableDiffusion,
        vars: &BTreeMap<String, Var>,
        run: &Run<'_>,
        trigger: &str,
        dir: &Path,
    ) -> Result<()> {
        let origin = origin(sd, run);
        let provenance = Provenance {
            method: Some("dreambooth".into()),
            name: Some(run.name.to_string()),
            word: Some(run.word.to_string()),
            trigger: Some(trigger.to_string()),
            rank: None,
            base_model: origin.base_model,
            train_steps: origin.train_steps,
        };
        let tensors: Vec<(&String, Tensor)> = vars
            .iter()
            .map(|(k, v)| (k, v.as_tensor().detach()))
            .collect();
        write_unet_folder(
            dir,
            tensors.iter().map(|(k, t)| (*k, t)),
            sd.unet.config(),
            &provenance,
        )
    }
}

fn check_trigger(trigger: &str) -> Result<()> {
    if trigger.trim().is_empty() || trigger.contains(char::is_whitespace) {
        return Err(Error::arg(
            "trigger",
            format!("{trigger:?}: the identifier is one word (DreamBooth's \"sks\")"),
        ));
    }
    Ok(())
}

impl Learner for FullUnet {
    fn method(&self) -> &'static str {
        "dreambooth"
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
        let (states, _) = data.prompts(sd, batch)?;
        // The parameters live in the trainable UNet; none given means the model's own.
        let unet = if params.is_empty() {
            &sd.unet
        } else {
            &self.unet
        };
        ddpm_loss_with(sd, unet, data, batch, &states, None)
    }

    fn settings(&self) -> serde_json::Value {
        serde_json::json!({ "trigger": self.trigger })
    }

    /// A diffusers `unet/` folder ([`FullUnet::write`]).
    fn save(&self, sd: &StableDiffusion, run: &Run<'_>, dir: &Path, stem: &str) -> Result<PathBuf> {
        let path = dir.join(stem);
        Self::write(sd, &self.vars, run, &self.trigger, &path)?;
        Ok(path)
    }

    fn read(&self, sd: &StableDiffusion, path: &Path, _: &Job) -> Result<BTreeMap<String, Tensor>> {
        if !path.is_dir() {
            return Err(not_a(path, "unet/ folder"));
        }
        let weights = crate::sd::hub::find_weights(path, "diffusion_pytorch_model", false)?;
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
