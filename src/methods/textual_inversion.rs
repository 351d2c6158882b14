//! Textual Inversion (Gal et al.; diffusers' `examples/textual_inversion/textual_inversion.py`):
//! the vectors of a new word, trained with the plain model's DDPM loss, nothing else.
//!
//! In a prompt the learned word stands where the class word was (see [`super::words`]: the
//! class word is the stand-in its vectors replace).
//!
//! Files: diffusers' `learned_embeds.safetensors` (`{token: [n, width]}`, with `format: pt`) and
//! AUTOMATIC1111's embeddings (`emb_params: [n, width]`, the token named after the file).

use std::any::Any;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Tensor, Var};

use super::common::{ddpm_loss, in_file, name_and_word, not_a, Origin};
use super::files::{check_float, Found, Provenance};
pub use super::words::{batch_states, text_states_with, Embedding};
use super::{Change, ConceptRef, ConceptRequest, CustomConcept, Method, Settings, Words};
use crate::error::{Error, Result};
use crate::job::Job;
use crate::sd::pipeline::StableDiffusion;
use crate::train::{Batch, Learner, Run, Trainer, TrainingSet};
use crate::util::tensors::plain;

/// The method.
pub struct TextualInversion;

impl Method for TextualInversion {
    fn name(&self) -> &'static str {
        "textual_inversion"
    }

    fn about(&self) -> &'static str {
        "a new word's vectors, from the class word's (diffusers' textual_inversion.py)"
    }

    /// diffusers' example: 3000 steps.
    fn default_steps(&self) -> usize {
        3000
    }

    /// 5e-4 scaled by the batch (the script's `--scale_lr`).
    fn default_lr(&self, batch: usize, _: bool) -> f64 {
        5e-4 * batch as f64
    }

    fn learner<'a>(
        &self,
        sd: &'a StableDiffusion,
        _: &Settings,
        word: &str,
        _: u64,
    ) -> Result<Box<dyn Learner + 'a>> {
        Ok(Box::new(LearnedWord::new(sd, word.trim())?))
    }

    fn reached(&self, trainer: &Trainer<'_>, _: &Settings) -> Result<ConceptRef> {
        Ok(Arc::new(LearnedWord::concept(
            trainer.model(),
            trainer.vars(),
            &trainer.run_info(),
        )?))
    }

    fn claims(&self, found: &Found) -> bool {
        let keys = found.keys();
        matches!(found, Found::File { .. })
            && !keys.iter().any(|k| k.contains("lora"))
            && found.meta("format") != Some(crate::infusion::concept::FORMAT)
            && (keys.iter().any(|k| k == "emb_params") || keys.len() == 1)
    }

    fn load(
        &self,
        found: &Found,
        req: &ConceptRequest,
        sd: Option<&StableDiffusion>,
        job: &Job,
    ) -> Result<ConceptRef> {
        req.refuse_others(self.name(), &["word"])?;
        let recorded = found.provenance()?;
        let embedding = read_embedding(found)?;
        let default_name = recorded.name.clone().unwrap_or_else(|| {
            embedding
                .token
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_string()
        });
        let (name, word) = name_and_word(req, default_name, recorded.word.as_deref())?;
        let concept = WordConcept {
            name,
            word,
            embedding,
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

/// The embedding of a Textual Inversion file: `emb_params` (A1111's, named after the file) or
/// its one tensor (diffusers', named by its key).
pub fn read_embedding(found: &Found) -> Result<Embedding> {
    let tensors = found.tensors()?;
    let bad = |msg: String| found.error(msg);
    let as_vectors = |k: &str, t: &Tensor| -> Result<Tensor> {
        check_float(k, t, &bad)?;
        let t = t.to_dtype(DType::F32)?;
        let t = match t.rank() {
            1 => t.unsqueeze(0)?,
            2 => t,
            _ => {
                return Err(bad(format!(
                    "tensor `{k}` has shape {:?}: an embedding is [vectors, width]",
                    t.dims()
                )))
            }
        };
        if t.dim(0)? == 0 || t.dim(1)? == 0 {
            return Err(bad(format!(
                "tensor `{k}` has shape {:?}: an embedding holds at least one vector",
                t.dims()
            )));
        }
        Ok(t)
    };
    if let Some(t) = tensors.get("emb_params") {
        let token = found
            .path()
            .file_stem()
            .map_or_else(|| "embedding".into(), |s| s.to_string_lossy().into_owned());
        return Ok(Embedding {
            token,
            vectors: as_vectors("emb_params", t)?,
        });
    }
    match tensors.iter().next() {
        Some((token, t)) if tensors.len() == 1 => Ok(Embedding {
            token: token.clone(),
            vectors: as_vectors(token, t)?,
        }),
        _ => Err(found.unclaimed()),
    }
}

/// A learned word, as a session holds it.
#[derive(Debug, Clone)]
pub struct WordConcept {
    pub name: String,
    pub word: String,
    pub embedding: Embedding,
    pub origin: Origin,
}

impl CustomConcept for WordConcept {
    fn name(&self) -> &str {
        &self.name
    }

    fn word(&self) -> &str {
        &self.word
    }

    fn method(&self) -> &'static str {
        "textual_inversion"
    }

    fn size_bytes(&self) -> usize {
        self.embedding.vectors.elem_count() * 4
    }

    fn summary(&self) -> String {
        let d = self.embedding.vectors.dims();
        format!(
            "Concept(<{}> = {}, textual_inversion, {} vector(s) of width {})",
            self.name,
            self.word,
            d[0],
            d.get(1).copied().unwrap_or(0)
        )
    }

    fn provenance(&self) -> Provenance {
        Provenance {
            method: Some(self.method().into()),
            name: Some(self.name.clone()),
            word: Some(self.word.clone()),
            trigger: None,
            rank: None,
            base_model: self.origin.base_model.clone(),
            train_steps: self.origin.train_steps,
        }
    }

    /// diffusers' `learned_embeds.safetensors` (`{"<name>": [n, width]}`, what
    /// `load_textual_inversion` takes), with its provenance in the metadata.
    fn save(&self, path: &Path, _: bool) -> Result<()> {
        let vectors = self
            .embedding
            .vectors
            .to_dtype(DType::F32)?
            .to_device(&candle_core::Device::Cpu)?
            .contiguous()?;
        let mut meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
        meta.extend(self.provenance().to_metadata());
        super::files::write_safetensors(path, vec![(format!("<{}>", self.name), vectors)], meta)
    }

    fn check(&self, sd: &StableDiffusion, _: bool, job: &Job) -> Result<()> {
        self.origin.warn_other_model(&self.name, sd, job);
        let tokens = sd.tokenize(&self.word)?;
        let span = tokens.positions_of_span(0..self.word.len());
        let span = match (span.first(), span.last()) {
            (Some(&a), Some(&b)) => a..b + 1,
            _ => 0..0,
        };
        text_states_with(sd, &tokens, &[(span, &self.embedding)], None).map(|_| ())
    }

    fn renamed(&self, name: &str) -> ConceptRef {
        Arc::new(Self {
            name: name.to_string(),
            ..self.clone()
        })
    }

    fn change(&self) -> Change<'_> {
        Change::words(vec![Words::Vectors {
            vectors: &self.embedding.vectors,
            stand_in: self.word.clone(),
        }])
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Textual Inversion's learner: the vectors of a new word, initialised from the class word's
/// token embeddings (one vector per token of the word, as the script's initializer token).
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

    /// The word learned in `vars` (a trainer's, of this learner, on `sd`), as a concept.
    pub fn concept(
        sd: &StableDiffusion,
        vars: &BTreeMap<String, Var>,
        run: &Run<'_>,
    ) -> Result<WordConcept> {
        let v = vars.get(VECTORS).ok_or_else(|| {
            Error::Internal(format!("not a Textual Inversion run (no `{VECTORS}`)"))
        })?;
        Ok(WordConcept {
            name: run.name.to_string(),
            word: run.word.to_string(),
            embedding: Embedding {
                token: format!("<{}>", run.name),
                vectors: plain(v.as_tensor())?.to_device(&candle_core::Device::Cpu)?,
            },
            origin: Origin::of_run(sd, run),
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
        let states = batch_states(sd, data, batch, &e)?;
        ddpm_loss(sd, &sd.unet, data, batch, &states, None)
    }

    /// diffusers' `learned_embeds.safetensors` layout.
    fn save(&self, sd: &StableDiffusion, run: &Run<'_>, dir: &Path, stem: &str) -> Result<PathBuf> {
        let path = dir.join(format!("{stem}.safetensors"));
        Self::concept(sd, &self.vars, run)?.save(&path, true)?;
        Ok(path)
    }

    fn read(
        &mut self,
        _: &StableDiffusion,
        path: &Path,
        _: &Job,
    ) -> Result<BTreeMap<String, Tensor>> {
        let found = Found::read(path)?;
        if !TextualInversion.claims(&found) {
            return Err(not_a(path, "Textual Inversion embedding"));
        }
        Ok(BTreeMap::from([(
            VECTORS.to_string(),
            read_embedding(&found)?.vectors,
        )]))
    }
}
