//! Perfusion (Tewel et al. 2023, "Key-Locked Rank One Editing for Text-to-Image
//! Personalization"), from the paper's equations (there is no official code). In every
//! cross-attention layer the key and value projections `W` get the gated rank-one edit
//!
//! ```text
//! W'e = W(e - (sim/E) i*) + sigmoid((sim/E - beta)/tau) o*,   sim = e^T C^-1 i*,  E = i*^T C^-1 i*
//! ```
//!
//! for every text encoding `e`: `i*` is the concept word's encoding (a running average, 0.99,
//! of it during training), `o*_K = W_K i_super` is locked to the superclass word's encoding
//! (the mean over the first batch; never trained), `o*_V` is trained from `W_V i_super`, and so
//! is the concept word's embedding (one vector, from the mean of the word's token embeddings).
//! `C` is the uncentered covariance of the text encoder's outputs over the non-padding tokens of
//! a caption list ([`covariance`]). Gate 0.75 / 0.1 in training, 0.7 / 0.15 at generation; lr
//! 0.03 for the outputs and 0.006 for the embedding, batch 4 x 4 accumulated, 400 steps
//! (ChenDarYen's configuration of the paper's).
//!
//! Several concepts in one prompt: the projection term is the `C^-1`-orthogonal projection on
//! the span of their `i*` (the paper's appendix: Gram-Schmidt in the metric `C^-1`), and the
//! gated terms are summed, each with its own similarity:
//! `W'e = W(e - I a) + sum_j sigmoid((sim_j/E_j - beta)/tau) o*_j`,
//! `a = (I^T C^-1 I)^-1 I^T C^-1 e` (for one concept, `a = sim/E`).
//!
//! Where ours departs from the paper: `i*` is a running average without gradient (the paper
//! does not say whether gradient flows through it); the superclass encoding is the class word's
//! last token's (a word of several tokens); local key locking only (the paper's global locking,
//! K from the prompt with the superclass word, is not built); our caption list is written for
//! this project, not the paper's LAION sample ([`BUILTIN_CAPTIONS`]).
//!
//! File: `perfusion-concept/1` safetensors: `embedding` [1, width], `target_input` and
//! `superclass_input` [width], `LAYER.value_output` [out] per layer; the gate, the name, word
//! and captions in its metadata. `C` is not in it: it is computed once per text encoder and
//! caption list and cached beside the concept (`perfusion-covariance-*.safetensors`).

use std::any::Any;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor, Var};
use nalgebra::DMatrix;

use super::common::{ddpm_loss, in_file, name_and_word, not_a, on_branch, Origin};
use super::files::{check_float, write_safetensors, Found, Provenance};
use super::words::{batch_states, Embedding};
use super::{
    count, number, word, Change, ConceptRef, ConceptRequest, CustomConcept, HookMaker, Method,
    Setting, SettingValue, Settings, Words,
};
use crate::error::{Error, Result};
use crate::job::Job;
use crate::sd::attention::{AttentionCall, LayerInfo};
use crate::sd::hook::{AttentionHook, AttnSite, Branch, Guidance, Projection};
use crate::sd::pipeline::StableDiffusion;
use crate::train::{Batch, Learner, Run, Trainer, TrainingSet};
use crate::util::tensors::plain_values;

/// The method.
pub struct Perfusion;

/// The `format` metadata of our files.
pub const FORMAT: &str = "perfusion-concept/1";
/// The caption list shipped with the tool (assets/perfusion/captions.txt: 1000 captions written
/// for this project by tools/make_perfusion_captions.py, under the repository's licence).
pub const BUILTIN_CAPTIONS: &str = include_str!("../../assets/perfusion/captions.txt");

const EMBEDDING: &str = "embedding";
const TARGET_INPUT: &str = "target_input";
const SUPERCLASS_INPUT: &str = "superclass_input";
const VALUE_OUTPUT: &str = "value_output";

const SETTINGS: [Setting; 9] = [
    Setting {
        name: "beta",
        doc: "the gate's threshold at generation (recorded in the file)",
        default: SettingValue::Number(0.7),
    },
    Setting {
        name: "tau",
        doc: "the gate's temperature at generation (recorded in the file)",
        default: SettingValue::Number(0.15),
    },
    Setting {
        name: "train_beta",
        doc: "the gate's threshold in training",
        default: SettingValue::Number(0.75),
    },
    Setting {
        name: "train_tau",
        doc: "the gate's temperature in training",
        default: SettingValue::Number(0.1),
    },
    Setting {
        name: "ema",
        doc: "the decay of the running average of the concept word's encoding",
        default: SettingValue::Number(0.99),
    },
    Setting {
        name: "accumulate",
        doc: "batches whose gradients make one update",
        default: SettingValue::Count(4),
    },
    Setting {
        name: "embedding_lr",
        doc: "the word embedding's learning rate as a multiple of the outputs' (0.006 / 0.03)",
        default: SettingValue::Number(0.2),
    },
    Setting {
        name: "locking",
        doc: "local (the keys' edit locks the concept's key to the class word's) or global (C's \
              keys come from the prompt with the class word in the concept's place)",
        default: SettingValue::Word("local"),
    },
    Setting {
        name: "captions",
        doc: "the caption list (one per line) of the covariance C: `builtin` for the shipped \
              one, or a file",
        default: SettingValue::Word("builtin"),
    },
];

/// The gate `sigmoid((sim/E - beta) / tau)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gate {
    pub beta: f64,
    pub tau: f64,
}

impl Gate {
    fn checked(beta: f64, tau: f64) -> Result<Self> {
        if !(tau > 0.0 && tau.is_finite() && beta.is_finite()) {
            return Err(Error::arg(
                "tau",
                format!("beta {beta} and tau {tau}: tau must be a positive number"),
            ));
        }
        Ok(Self { beta, tau })
    }
}

/// The projection `W` [out, in] of `layer`.
fn weight(sd: &StableDiffusion, layer: &str, p: Projection) -> Result<Tensor> {
    let attn = sd.unet.cross_attention(layer).ok_or_else(|| {
        Error::arg(
            "concept",
            format!("`{layer}` is not a cross-attention layer of this model"),
        )
    })?;
    Ok(attn.projection(p).0.clone())
}

/// `W x` for a vector `x` [in]: [out].
fn apply(w: &Tensor, x: &Tensor) -> Result<Tensor> {
    Ok(
        w.matmul(&x.to_dtype(w.dtype())?.to_device(w.device())?.unsqueeze(1)?)?
            .squeeze(1)?,
    )
}

impl Method for Perfusion {
    fn name(&self) -> &'static str {
        "perfusion"
    }

    fn about(&self) -> &'static str {
        "a gated rank-one edit of the cross-attention keys (locked to the class word) and \
         values, and the word's embedding (Tewel et al. 2023, from the paper's equations)"
    }

    fn settings(&self) -> &'static [Setting] {
        &SETTINGS
    }

    fn default_steps(&self) -> usize {
        400
    }

    /// 0.03 for the value outputs (the embedding's is `embedding_lr` times that), whatever the
    /// batch.
    fn default_lr(&self, _: usize, _: bool) -> f64 {
        0.03
    }

    fn learner<'a>(
        &self,
        sd: &'a StableDiffusion,
        settings: &Settings,
        word: &str,
        _: u64,
    ) -> Result<Box<dyn Learner + 'a>> {
        Ok(Box::new(KeyLocked::new(sd, settings, word)?))
    }

    fn reached(&self, trainer: &Trainer<'_>, settings: &Settings) -> Result<ConceptRef> {
        let mut values = plain_values(trainer.vars())?;
        values.extend(trainer.buffers());
        Ok(Arc::new(KeyLocked::concept(
            trainer.model(),
            values,
            &trainer.run_info(),
            settings,
        )?))
    }

    fn claims(&self, found: &Found) -> bool {
        found.meta("format") == Some(FORMAT)
    }

    fn load(
        &self,
        found: &Found,
        req: &ConceptRequest,
        sd: Option<&StableDiffusion>,
        job: &Job,
    ) -> Result<ConceptRef> {
        req.refuse_others(self.name(), &["word", "beta", "tau"])?;
        let path = found.path();
        let recorded = found.provenance()?;
        let bad = |msg: String| found.error(msg);
        let meta_number = |k: &str| -> Result<f64> {
            let v = found
                .meta(k)
                .ok_or_else(|| bad(format!("no `{k}` in its metadata")))?;
            v.parse()
                .map_err(|_| bad(format!("its `{k}` ({v:?}) is not a number")))
        };
        let gate = Gate::checked(meta_number("beta")?, meta_number("tau")?)
            .map_err(|e| bad(e.to_string()))?;
        // The request's gate in place of the file's.
        let gate = Gate::checked(req.beta.unwrap_or(gate.beta), req.tau.unwrap_or(gate.tau))?;
        let captions = found.meta("captions").unwrap_or("builtin").to_string();
        let global = match found.meta("locking").unwrap_or("local") {
            "local" => false,
            "global" => true,
            other => {
                return Err(bad(format!(
                    "its locking {other:?} is neither local nor global"
                )))
            }
        };
        let mut tensors = found.tensors()?;
        let mut take = |k: &str| -> Result<Tensor> {
            let t = tensors.remove(k).ok_or_else(|| bad(format!("no `{k}`")))?;
            check_float(k, &t, &bad)?;
            Ok(t.to_dtype(DType::F32)?)
        };
        let embedding = take(EMBEDDING)?;
        let target_input = take(TARGET_INPUT)?;
        let superclass_input = take(SUPERCLASS_INPUT)?;
        let mut value_outputs = BTreeMap::new();
        for (k, t) in std::mem::take(&mut tensors) {
            let Some(layer) = k.strip_suffix(&format!(".{VALUE_OUTPUT}")) else {
                return Err(bad(format!("`{k}` is not LAYER.{VALUE_OUTPUT}")));
            };
            check_float(&k, &t, &bad)?;
            value_outputs.insert(layer.to_string(), t.to_dtype(DType::F32)?);
        }
        let width = embedding.dim(embedding.rank().saturating_sub(1))?;
        if embedding.dims() != [1, width]
            || target_input.dims() != [width]
            || superclass_input.dims() != [width]
        {
            return Err(bad(format!(
                "shapes {:?}, {:?}, {:?}: `{EMBEDDING}` is [1, width], `{TARGET_INPUT}` and \
                 `{SUPERCLASS_INPUT}` [width]",
                embedding.dims(),
                target_input.dims(),
                superclass_input.dims()
            )));
        }
        if value_outputs.is_empty() {
            return Err(bad("no layer's value output".into()));
        }
        let stem = path
            .file_stem()
            .map_or_else(String::new, |s| s.to_string_lossy().into_owned());
        let default_name = recorded.name.clone().unwrap_or(stem);
        let (name, word) = name_and_word(req, default_name, recorded.word.as_deref())?;
        let concept = PerfusionConcept {
            name,
            word,
            embedding,
            target_input,
            superclass_input,
            value_outputs,
            gate,
            global,
            captions,
            home: path.parent().map(Path::to_path_buf),
            origin: Origin::recorded(&recorded),
        };
        if let Some(sd) = sd {
            concept
                .check(sd, false, job)
                .map_err(|e| in_file(e, path))?;
            // C now, with the job's progress and notes, rather than silently at generation.
            concept.covariance(sd, job)?;
        }
        Ok(Arc::new(concept))
    }
}

// ---------------------------------------------------------------------------------------------
// The covariance C.

/// The uncentered covariance `C = mean(e e^T)` of a text encoder's outputs over the
/// non-padding tokens (start and end tokens included) of a caption list, and its inverse.
#[derive(Debug)]
pub struct Covariance {
    pub matrix: DMatrix<f64>,
    pub inverse: DMatrix<f64>,
    /// Captions averaged over.
    pub captions: usize,
}

/// The captions of `source` (`builtin`, or a file of one caption a line) and an id of them.
pub fn captions(source: &str) -> Result<(Vec<String>, String)> {
    let (text, id) = if source == "builtin" {
        (BUILTIN_CAPTIONS.to_string(), "builtin".to_string())
    } else {
        let path = Path::new(source);
        let bytes = crate::util::fs::read_regular(path)?;
        let text = String::from_utf8(bytes).map_err(|_| Error::Format {
            path: path.to_path_buf(),
            msg: "not UTF-8 text (a caption list is one caption a line)".into(),
        })?;
        let id = {
            use sha2::{Digest, Sha256};
            let h = Sha256::digest(text.as_bytes());
            format!("sha256:{}", hex(&h[..8]))
        };
        (text, id)
    };
    let lines: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    if lines.is_empty() {
        // Only a file can be empty (the builtin list is not).
        return Err(Error::Format {
            path: source.into(),
            msg: "no captions (one caption a line)".into(),
        });
    }
    Ok((lines, id))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `C` of `sd`'s text encoder over `captions` (16 at a time).
pub fn covariance_of(sd: &StableDiffusion, captions: &[String], job: &Job) -> Result<DMatrix<f64>> {
    let w = sd.text_encoder.hidden_size();
    let mut sum = Tensor::zeros((w, w), DType::F64, &Device::Cpu)?;
    let mut n = 0usize;
    let chunks: Vec<&[String]> = captions.chunks(16).collect();
    let bar = job.bar(chunks.len(), "perfusion: the text encoder's covariance");
    for chunk in chunks {
        job.check()?;
        let tokens = chunk
            .iter()
            .map(|c| sd.tokenize(c))
            .collect::<Result<Vec<_>>>()?;
        let len = tokens[0].ids.len();
        let ids: Vec<u32> = tokens.iter().flat_map(|t| t.ids.iter().copied()).collect();
        let ids = Tensor::from_vec(ids, (tokens.len(), len), sd.device())?;
        let states = sd
            .text_encoder
            .forward(&ids)?
            .to_dtype(DType::F64)?
            .to_device(&Device::Cpu)?;
        for (i, t) in tokens.iter().enumerate() {
            let x = states.get(i)?.narrow(0, 0, t.n_tokens)?;
            sum = (sum + x.t()?.matmul(&x)?)?;
            n += t.n_tokens;
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let sum = sum.to_vec2::<f64>()?;
    Ok(DMatrix::from_fn(w, w, |i, j| sum[i][j] / n as f64))
}

/// `C^-1` by Cholesky; a C that is not positive definite (too few captions for the width) gets
/// a ridge `lambda I` (from 1e-8 of its mean diagonal, x100 until it factors), said in `job`.
fn inverse(c: &DMatrix<f64>, job: &Job) -> Result<DMatrix<f64>> {
    let n = c.nrows();
    let scale = c.trace() / n as f64;
    let mut ridge = 0.0;
    for _ in 0..6 {
        let m = c + DMatrix::identity(n, n) * ridge;
        if let Some(ch) = m.cholesky() {
            if ridge > 0.0 {
                job.note(format!(
                    "perfusion: the covariance is singular (too few caption tokens for width \
                     {n}?); inverted with a ridge of {ridge:.2e}"
                ));
            }
            return Ok(ch.inverse());
        }
        ridge = if ridge == 0.0 {
            1e-8 * scale
        } else {
            ridge * 100.0
        };
    }
    Err(Error::arg(
        "captions",
        "the covariance of the captions' encodings cannot be inverted: give more captions",
    ))
}

/// Covariances computed in this process, by text encoder and caption list.
static COVARIANCES: Mutex<BTreeMap<String, Arc<Covariance>>> = Mutex::new(BTreeMap::new());

const COVARIANCE_FORMAT: &str = "perfusion-covariance/1";

/// `C` of `sd`'s text encoder over the captions of `source`: from this process's cache, the
/// file cached in `home` (checked against the encoder's fingerprint and the captions), or
/// computed (and cached there when `home` is writable).
pub fn covariance(
    sd: &StableDiffusion,
    source: &str,
    home: Option<&Path>,
    job: &Job,
) -> Result<Arc<Covariance>> {
    let (list, id) = captions(source)?;
    let fp = sd.text_fingerprint().to_string();
    let key = format!("{fp}|{id}");
    let file = home.map(|h| {
        use sha2::{Digest, Sha256};
        h.join(format!(
            "perfusion-covariance-{}.safetensors",
            hex(&Sha256::digest(key.as_bytes())[..6])
        ))
    });
    let cache = |f: &Path, m: &DMatrix<f64>, n: usize| {
        if let Err(e) = write_covariance(f, m, &fp, &id, n) {
            job.note(format!("perfusion: the covariance is not cached: {e}"));
        }
    };
    let known = COVARIANCES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&key)
        .cloned();
    if let Some(c) = known {
        if let Some(f) = file.as_deref().filter(|f| !f.exists()) {
            cache(f, &c.matrix, c.captions);
        }
        return Ok(c);
    }
    let cached = file.as_deref().and_then(|f| read_covariance(f, &fp, &id));
    let (matrix, count) = match cached {
        Some(c) => c,
        None => {
            let m = covariance_of(sd, &list, job)?;
            if let Some(f) = &file {
                cache(f, &m, list.len());
            }
            (m, list.len())
        }
    };
    let c = Arc::new(Covariance {
        inverse: inverse(&matrix, job)?,
        matrix,
        captions: count,
    });
    COVARIANCES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, c.clone());
    Ok(c)
}

/// A cached covariance, if `path` holds one of this encoder and caption list.
fn read_covariance(path: &Path, fp: &str, id: &str) -> Option<(DMatrix<f64>, usize)> {
    let found = Found::read(path).ok()?;
    if found.meta("format") != Some(COVARIANCE_FORMAT)
        || found.meta("text_encoder") != Some(fp)
        || found.meta("captions") != Some(id)
    {
        return None;
    }
    let count = found.meta("captions_count")?.parse().ok()?;
    let t = found.tensors().ok()?.remove("covariance")?;
    let (r, c) = t.dims2().ok()?;
    let v = t.to_dtype(DType::F64).ok()?.to_vec2::<f64>().ok()?;
    Some((DMatrix::from_fn(r, c, |i, j| v[i][j]), count))
}

fn write_covariance(
    path: &Path,
    m: &DMatrix<f64>,
    fp: &str,
    id: &str,
    captions: usize,
) -> Result<()> {
    let n = m.nrows();
    let data: Vec<f64> = (0..n)
        .flat_map(|i| (0..n).map(move |j| m[(i, j)]))
        .collect();
    let t = Tensor::from_vec(data, (n, n), &Device::Cpu)?;
    let meta = HashMap::from([
        ("format".to_string(), COVARIANCE_FORMAT.to_string()),
        ("text_encoder".to_string(), fp.to_string()),
        ("captions".to_string(), id.to_string()),
        ("captions_count".to_string(), captions.to_string()),
    ]);
    write_safetensors(path, vec![("covariance".to_string(), t)], meta)
}

// ---------------------------------------------------------------------------------------------
// The edit.

/// One concept's part of an edit: its target input `i*` [width], its superclass input (for
/// `o*_K = W_K i_super`) and its value outputs `o*_V` by layer.
pub struct Target<'a> {
    pub input: &'a Tensor,
    pub superclass: &'a Tensor,
    pub values: &'a BTreeMap<String, Tensor>,
}

/// The directions of an edit for targets `inputs` (the columns of `I`, [width, n]): `U = C^-1
/// I (I^T C^-1 I)^-1`, whose `e^T U` is the coordinates `a` of the projection of `e` on their
/// span, and `V`, the columns `C^-1 i_j / E_j` whose `e^T V` is each target's `sim_j / E_j`.
pub fn directions(
    inverse: &DMatrix<f64>,
    inputs: &[Vec<f64>],
) -> Result<(DMatrix<f64>, DMatrix<f64>)> {
    let w = inverse.nrows();
    let n = inputs.len();
    let i = DMatrix::from_fn(w, n, |r, c| inputs[c][r]);
    let ci = inverse * &i;
    let gram = i.transpose() * &ci;
    let g_inv = gram
        .clone()
        .try_inverse()
        .filter(|g| g.iter().all(|x| x.is_finite()));
    let g_inv = g_inv.ok_or_else(|| {
        Error::arg(
            "prompt",
            "these Perfusion concepts' target encodings are linearly dependent (the same \
             concept twice?): their edits cannot be told apart",
        )
    })?;
    let u = &ci * g_inv;
    let v = DMatrix::from_fn(w, n, |r, c| ci[(r, c)] / gram[(c, c)]);
    Ok((u, v))
}

fn to_tensor(m: &DMatrix<f64>, device: &Device, dtype: DType) -> Result<Tensor> {
    let (r, c) = m.shape();
    let data: Vec<f64> = (0..r)
        .flat_map(|i| (0..c).map(move |j| m[(i, j)]))
        .collect();
    Ok(Tensor::from_vec(data, (r, c), &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)?)
}

fn to_f64(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f64>()?)
}

/// Key-locked rank-one edits of the cross-attention layers' key and value projections, for one
/// or several concepts (see the module's text), on the rows of `branch` (every row without one).
pub struct RankOneHook {
    /// `U` and `V` [width, n].
    u: Tensor,
    v: Tensor,
    gate: Gate,
    /// `(layer, projection)` -> (`W I` as rows [n, out], `O*` [n, out]).
    edits: HashMap<(String, Projection), (Tensor, Tensor)>,
    branch: Option<Branch>,
    /// Global locking: the text states with the class words in the concepts' places (one row
    /// for every conditional row of the branch, or a row per batch row without a branch), and
    /// each layer's `W_K^T`; the keys of those rows are their plain projection.
    global: Option<(Tensor, HashMap<String, Tensor>)>,
}

impl RankOneHook {
    pub fn new(
        sd: &StableDiffusion,
        inverse: &DMatrix<f64>,
        targets: &[Target<'_>],
        gate: Gate,
        branch: Option<Branch>,
        global: Option<&Tensor>,
    ) -> Result<Self> {
        let (dev, dt) = (sd.device(), sd.dtype());
        let inputs = targets
            .iter()
            .map(|t| to_f64(t.input))
            .collect::<Result<Vec<_>>>()?;
        let (u, v) = directions(inverse, &inputs)?;
        let layers = targets[0].values.keys();
        let mut edits = HashMap::new();
        for layer in layers {
            for p in [Projection::Key, Projection::Value] {
                let w = weight(sd, layer, p)?;
                let mut wi = vec![];
                let mut outs = vec![];
                for t in targets {
                    wi.push(apply(&w, t.input)?);
                    outs.push(match p {
                        Projection::Key => apply(&w, t.superclass)?,
                        _ => t
                            .values
                            .get(layer)
                            .ok_or_else(|| {
                                Error::arg(
                                    "prompt",
                                    format!("a Perfusion concept has no edit of `{layer}`"),
                                )
                            })?
                            .to_device(dev)?
                            .to_dtype(dt)?,
                    });
                }
                edits.insert(
                    (layer.clone(), p),
                    (Tensor::stack(&wi, 0)?, Tensor::stack(&outs, 0)?),
                );
            }
        }
        let global = match global {
            Some(states) => {
                let mut weights = HashMap::new();
                for (layer, _) in edits.keys() {
                    weights.insert(layer.clone(), weight(sd, layer, Projection::Key)?.t()?);
                }
                Some((states.to_device(dev)?.to_dtype(dt)?, weights))
            }
            None => None,
        };
        Ok(Self {
            u: to_tensor(&u, dev, dt)?,
            v: to_tensor(&v, dev, dt)?,
            gate,
            edits,
            branch,
            global,
        })
    }

    /// The edited projection of `input` [b, t, width] whose plain projection is `output`.
    pub fn edit(
        &self,
        layer: &str,
        projection: Projection,
        input: &Tensor,
        output: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let Some((wi, o)) = self.edits.get(&(layer.to_string(), projection)) else {
            return Ok(None);
        };
        let a = input.broadcast_matmul(&self.u)?;
        let s = input.broadcast_matmul(&self.v)?;
        let x = ((s - self.gate.beta)? / self.gate.tau)?;
        // sigmoid(x) = 1 / (1 + exp(-x)), with its gradient.
        let g = (x.neg()?.exp()? + 1.0)?.recip()?;
        let new = ((output - a.broadcast_matmul(wi)?)? + g.broadcast_matmul(o)?)?;
        Ok(Some(new))
    }
}

impl AttentionHook for RankOneHook {
    fn wants(&self, layer: &LayerInfo) -> bool {
        self.edits
            .contains_key(&(layer.path.clone(), Projection::Key))
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
        if let (Projection::Key, Some((states, weights))) = (projection, &self.global) {
            let Some(wt) = weights.get(&site.layer.path) else {
                return Ok(output);
            };
            let keys = states.broadcast_matmul(wt)?;
            let Some(branch) = self.branch else {
                return Ok(keys);
            };
            // C's conditional rows; its unconditional ones (the negative prompt) stay plain.
            let mask: Vec<f32> = site
                .rows
                .rows()
                .iter()
                .map(|r| (r.branch == branch && r.guidance == Guidance::Conditional) as u8 as f32)
                .collect();
            let n = mask.len();
            let mask =
                Tensor::from_vec(mask, (n, 1, 1), output.device())?.to_dtype(output.dtype())?;
            let keys = keys.broadcast_as(output.shape())?;
            return output.broadcast_mul(&(1.0 - &mask)?)? + keys.broadcast_mul(&mask)?;
        }
        match self.edit(&site.layer.path, projection, input, &output)? {
            Some(new) => on_branch(site, self.branch, output, new),
            None => Ok(output),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The concept.

/// A Perfusion concept, as a session holds it.
#[derive(Debug, Clone)]
pub struct PerfusionConcept {
    pub name: String,
    pub word: String,
    /// The concept word's embedding [1, width].
    pub embedding: Tensor,
    /// `i*` [width].
    pub target_input: Tensor,
    /// The superclass word's encoding [width] (`o*_K = W_K` of it).
    pub superclass_input: Tensor,
    /// `o*_V` by layer [out].
    pub value_outputs: BTreeMap<String, Tensor>,
    /// The gate at generation.
    pub gate: Gate,
    /// Global key locking (C's keys from the prompt with the class word).
    pub global: bool,
    /// The caption list of its covariance (`builtin` or a file).
    pub captions: String,
    /// The folder its covariance is cached in (its file's).
    pub home: Option<PathBuf>,
    pub origin: Origin,
}

impl PerfusionConcept {
    /// Its covariance on `sd`'s text encoder.
    pub fn covariance(&self, sd: &StableDiffusion, job: &Job) -> Result<Arc<Covariance>> {
        covariance(sd, &self.captions, self.home.as_deref(), job)
    }

    fn target(&self) -> Target<'_> {
        Target {
            input: &self.target_input,
            superclass: &self.superclass_input,
            values: &self.value_outputs,
        }
    }
}

impl CustomConcept for PerfusionConcept {
    fn name(&self) -> &str {
        &self.name
    }

    fn word(&self) -> &str {
        &self.word
    }

    fn method(&self) -> &'static str {
        "perfusion"
    }

    fn size_bytes(&self) -> usize {
        (self.embedding.elem_count()
            + self.target_input.elem_count()
            + self.superclass_input.elem_count()
            + self
                .value_outputs
                .values()
                .map(Tensor::elem_count)
                .sum::<usize>())
            * 4
    }

    fn summary(&self) -> String {
        format!(
            "Concept(<{}> = {}, perfusion, {} layers, beta {}, tau {})",
            self.name,
            self.word,
            self.value_outputs.len(),
            self.gate.beta,
            self.gate.tau
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

    /// A `perfusion-concept/1` file (always f32: it is small).
    fn save(&self, path: &Path, _: bool) -> Result<()> {
        let cpu = |t: &Tensor| -> Result<Tensor> {
            Ok(t.to_dtype(DType::F32)?
                .to_device(&Device::Cpu)?
                .contiguous()?)
        };
        let mut tensors = vec![
            (EMBEDDING.to_string(), cpu(&self.embedding)?),
            (TARGET_INPUT.to_string(), cpu(&self.target_input)?),
            (SUPERCLASS_INPUT.to_string(), cpu(&self.superclass_input)?),
        ];
        for (layer, t) in &self.value_outputs {
            tensors.push((format!("{layer}.{VALUE_OUTPUT}"), cpu(t)?));
        }
        let mut meta = self.provenance().to_metadata();
        meta.insert("format".into(), FORMAT.into());
        meta.insert("beta".into(), self.gate.beta.to_string());
        meta.insert("tau".into(), self.gate.tau.to_string());
        meta.insert("captions".into(), self.captions.clone());
        meta.insert(
            "locking".into(),
            if self.global { "global" } else { "local" }.into(),
        );
        write_safetensors(path, tensors, meta)
    }

    /// Widths: the embedding and inputs the text encoder's, each value output its layer's.
    fn check(&self, sd: &StableDiffusion, _: bool, job: &Job) -> Result<()> {
        self.origin.warn_other_model(&self.name, sd, job);
        let width = sd.text_encoder.hidden_size();
        if self.embedding.dim(1)? != width || self.target_input.dim(0)? != width {
            return Err(Error::arg(
                "concept",
                format!(
                    "<{}>: width {}, this model's text encoder's {width}",
                    self.name,
                    self.embedding.dim(1)?
                ),
            ));
        }
        for (layer, o) in &self.value_outputs {
            let w = weight(sd, layer, Projection::Value)?;
            if o.dims() != [w.dim(0)?] {
                return Err(Error::arg(
                    "concept",
                    format!(
                        "`{layer}`'s value output has shape {:?}, this model's values width {} \
                         (a concept of another model?)",
                        o.dims(),
                        w.dim(0)?
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
            words: vec![Words::Vectors {
                vectors: &self.embedding,
                stand_in: self.word.clone(),
            }],
            residuals: None,
            hooks: Some(self),
            unet: None,
        }
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl HookMaker for PerfusionConcept {
    /// Its edit alone (the keys locally locked: global locking needs the prompt, see
    /// [`HookMaker::joint_unet_hook`]).
    fn unet_hook(&self, sd: &StableDiffusion, branch: Branch) -> Result<Box<dyn AttentionHook>> {
        let cov = self.covariance(sd, &Job::quiet())?;
        Ok(Box::new(RankOneHook::new(
            sd,
            &cov.inverse,
            &[self.target()],
            self.gate,
            Some(branch),
            None,
        )?))
    }

    fn text_hook(&self, _: &StableDiffusion) -> Result<Option<Box<dyn AttentionHook>>> {
        Ok(None)
    }

    fn joint(&self) -> bool {
        true
    }

    /// The edits of every Perfusion concept of the prompt, orthogonalised together, with this
    /// concept's gate, covariance and locking (global: C's keys from `base`, the prompt with
    /// the class words).
    fn joint_unet_hook(
        &self,
        peers: &[&dyn CustomConcept],
        sd: &StableDiffusion,
        branch: Branch,
        base: &str,
    ) -> Result<Box<dyn AttentionHook>> {
        let concepts: Vec<&PerfusionConcept> = peers
            .iter()
            .filter_map(|c| c.as_any().downcast_ref::<PerfusionConcept>())
            .collect();
        let cov = self.covariance(sd, &Job::quiet())?;
        let targets: Vec<Target<'_>> = concepts.iter().map(|c| c.target()).collect();
        let global = match self.global {
            true => Some(sd.text_states(&[&sd.tokenize(base)?])?),
            false => None,
        };
        Ok(Box::new(RankOneHook::new(
            sd,
            &cov.inverse,
            &targets,
            self.gate,
            Some(branch),
            global.as_ref(),
        )?))
    }
}

// ---------------------------------------------------------------------------------------------
// Training.

/// Perfusion's learner: the word's embedding and each layer's value output `o*_V` train; the
/// target input `i*` (a running average of the word's encoding) and the superclass input are
/// set from the batches.
pub struct KeyLocked {
    vars: BTreeMap<String, Var>,
    initial: BTreeMap<String, Tensor>,
    /// `i*` and `i_super` [width], from the first batch on.
    target_input: Option<Tensor>,
    superclass_input: Option<Tensor>,
    cov: Arc<Covariance>,
    train_gate: Gate,
    ema: f64,
    accumulate: usize,
    embedding_lr: f64,
    global: bool,
    settings: Settings,
}

impl KeyLocked {
    pub fn new(sd: &StableDiffusion, settings: &Settings, word: &str) -> Result<Self> {
        let train_gate = Gate::checked(
            number(settings, "train_beta")?,
            number(settings, "train_tau")?,
        )?;
        Gate::checked(number(settings, "beta")?, number(settings, "tau")?)?;
        let ema = number(settings, "ema")?;
        if !(0.0..1.0).contains(&ema) {
            return Err(Error::arg("ema", format!("{ema}: a decay in [0, 1)")));
        }
        let embedding_lr = number(settings, "embedding_lr")?;
        if !(embedding_lr >= 0.0 && embedding_lr.is_finite()) {
            return Err(Error::arg(
                "embedding_lr",
                format!("{embedding_lr}: a multiple of the learning rate (0 or more)"),
            ));
        }
        let cov = covariance(sd, word_setting(settings)?, None, &Job::quiet())?;
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
            .mean_keepdim(0)?
            .detach();
        let mut vars = BTreeMap::from([(EMBEDDING.to_string(), Var::from_tensor(&init)?)]);
        for layer in sd.unet.cross_attention_layers() {
            let out = weight(sd, &layer.path, Projection::Value)?.dim(0)?;
            vars.insert(
                format!("{}.{VALUE_OUTPUT}", layer.path),
                Var::zeros(out, DType::F32, sd.device())?,
            );
        }
        let initial = plain_values(&vars)?;
        Ok(Self {
            vars,
            initial,
            target_input: None,
            superclass_input: None,
            cov,
            train_gate,
            ema,
            accumulate: count(settings, "accumulate")?,
            embedding_lr,
            global: locking(settings)?,
            settings: settings.clone(),
        })
    }

    /// The concept of `values` (a trainer's plain parameters and buffers) on `sd`.
    pub fn concept(
        sd: &StableDiffusion,
        mut values: BTreeMap<String, Tensor>,
        run: &Run<'_>,
        settings: &Settings,
    ) -> Result<PerfusionConcept> {
        let mut take = |k: &str| -> Result<Tensor> {
            values
                .remove(k)
                .ok_or_else(|| Error::Internal(format!("not a Perfusion run (no `{k}`)")))?
                .to_device(&Device::Cpu)
                .map_err(Into::into)
        };
        let embedding = take(EMBEDDING)?;
        let (target_input, superclass_input) = match (take(TARGET_INPUT), take(SUPERCLASS_INPUT)) {
            (Ok(t), Ok(s)) => (t, s),
            _ => {
                return Err(Error::arg(
                    "train_steps",
                    "a Perfusion run saves its concept after its first step (its target is \
                     set from the first batch)",
                ))
            }
        };
        let value_outputs = values
            .into_iter()
            .filter_map(|(k, v)| {
                k.strip_suffix(&format!(".{VALUE_OUTPUT}"))
                    .map(|l| Ok((l.to_string(), v.to_device(&Device::Cpu)?)))
            })
            .collect::<Result<_>>()?;
        Ok(PerfusionConcept {
            name: run.name.to_string(),
            word: run.word.to_string(),
            embedding,
            target_input,
            superclass_input,
            value_outputs,
            gate: Gate::checked(number(settings, "beta")?, number(settings, "tau")?)?,
            global: locking(settings)?,
            captions: word_setting(settings)?.to_string(),
            home: None,
            origin: Origin::of_run(sd, run),
        })
    }

    /// The concept word's encodings in C's prompts of `batch` (with the embedding `e`), and
    /// the class word's in F's: the means over the batch [width].
    fn encodings(
        &self,
        sd: &StableDiffusion,
        data: &TrainingSet,
        batch: &Batch,
        e: &Embedding,
    ) -> Result<(Tensor, Tensor)> {
        // The learned word's one vector sits where its words began.
        let states = batch_states(sd, data, batch, e)?;
        let mut concept = vec![];
        for (i, (_, pos)) in data.prompt_tokens(batch).into_iter().enumerate() {
            concept.push(states.get(i)?.get(pos[0])?);
        }
        let (states, positions) = data.prompts(sd, batch)?;
        let mut plain = vec![];
        for (i, pos) in positions.iter().enumerate() {
            plain.push(states.get(i)?.get(pos[pos.len() - 1])?);
        }
        let mean = |v: Vec<Tensor>| -> Result<Tensor> {
            Ok(Tensor::stack(&v, 0)?
                .to_dtype(DType::F32)?
                .mean(0)?
                .detach())
        };
        Ok((mean(concept)?, mean(plain)?))
    }
}

/// Whether the `locking` setting is global.
fn locking(settings: &Settings) -> Result<bool> {
    match word(settings, "locking")? {
        "local" => Ok(false),
        "global" => Ok(true),
        other => Err(Error::arg("locking", format!("`{other}`: local or global"))),
    }
}

/// The `captions` setting.
fn word_setting(settings: &Settings) -> Result<&str> {
    word(settings, "captions")
}

impl Learner for KeyLocked {
    fn method(&self) -> &'static str {
        "perfusion"
    }

    fn vars(&self) -> &BTreeMap<String, Var> {
        &self.vars
    }

    fn initial(&self) -> &BTreeMap<String, Tensor> {
        &self.initial
    }

    /// The running average of the word's encoding; on the first batch also the superclass
    /// input and the value outputs' start, `W_V i_super`.
    fn observe(&mut self, sd: &StableDiffusion, data: &TrainingSet, batch: &Batch) -> Result<()> {
        let e = Embedding {
            token: "concept".into(),
            vectors: self.vars[EMBEDDING].as_tensor().detach(),
        };
        let (concept, plain) = self.encodings(sd, data, batch, &e)?;
        match &self.target_input {
            Some(t) => {
                self.target_input = Some(((t * self.ema)? + (concept * (1.0 - self.ema))?)?);
            }
            None => {
                for (k, var) in &self.vars {
                    if let Some(layer) = k.strip_suffix(&format!(".{VALUE_OUTPUT}")) {
                        let w = weight(sd, layer, Projection::Value)?;
                        let o = apply(&w, &plain)?.to_dtype(DType::F32)?;
                        var.set(&o)?;
                        self.initial.insert(k.clone(), o);
                    }
                }
                self.target_input = Some(concept);
                self.superclass_input = Some(plain);
            }
        }
        Ok(())
    }

    fn accumulate(&self) -> usize {
        self.accumulate
    }

    fn lr_scale(&self, name: &str) -> f64 {
        if name == EMBEDDING {
            self.embedding_lr
        } else {
            1.0
        }
    }

    fn buffers(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        if let (Some(t), Some(s)) = (&self.target_input, &self.superclass_input) {
            out.insert(TARGET_INPUT.to_string(), t.clone());
            out.insert(SUPERCLASS_INPUT.to_string(), s.clone());
        }
        out
    }

    fn loss(
        &self,
        sd: &StableDiffusion,
        data: &TrainingSet,
        batch: &Batch,
        params: &BTreeMap<String, Tensor>,
    ) -> Result<Tensor> {
        let e = Embedding {
            token: "concept".into(),
            vectors: params[EMBEDDING].clone(),
        };
        let states = batch_states(sd, data, batch, &e)?;
        let (Some(input), Some(superclass)) = (&self.target_input, &self.superclass_input) else {
            // Before the first batch has set the target: the plain model on the word's vector.
            return ddpm_loss(sd, &sd.unet, data, batch, &states, None);
        };
        let values: BTreeMap<String, Tensor> = params
            .iter()
            .filter_map(|(k, v)| {
                k.strip_suffix(&format!(".{VALUE_OUTPUT}"))
                    .map(|l| (l.to_string(), v.clone()))
            })
            .collect();
        // Global locking: the keys of the prompts with the class word, the batch's F states.
        let global = match self.global {
            true => Some(data.prompts(sd, batch)?.0),
            false => None,
        };
        let hook = RankOneHook::new(
            sd,
            &self.cov.inverse,
            &[Target {
                input,
                superclass,
                values: &values,
            }],
            self.train_gate,
            None,
            global.as_ref(),
        )?;
        ddpm_loss(sd, &sd.unet, data, batch, &states, Some(&hook))
    }

    fn settings(&self) -> serde_json::Value {
        serde_json::to_value(&self.settings).unwrap_or_default()
    }

    fn save(&self, sd: &StableDiffusion, run: &Run<'_>, dir: &Path, stem: &str) -> Result<PathBuf> {
        let path = dir.join(format!("{stem}.safetensors"));
        let mut values = plain_values(&self.vars)?;
        values.extend(self.buffers());
        Self::concept(sd, values, run, &self.settings)?.save(&path, true)?;
        Ok(path)
    }

    fn read(
        &mut self,
        sd: &StableDiffusion,
        path: &Path,
        job: &Job,
    ) -> Result<BTreeMap<String, Tensor>> {
        let found = Found::read(path)?;
        if !Perfusion.claims(&found) {
            return Err(not_a(path, "Perfusion concept"));
        }
        let req = ConceptRequest {
            path: path.to_path_buf(),
            word: Some("concept".into()),
            ..Default::default()
        };
        let c = Perfusion.load(&found, &req, None, job)?;
        let c = c
            .as_any()
            .downcast_ref::<PerfusionConcept>()
            .ok_or_else(|| Error::Internal("a Perfusion file read as another concept".into()))?;
        c.check(sd, false, &Job::quiet())?;
        self.target_input = Some(c.target_input.to_device(sd.device())?);
        self.superclass_input = Some(c.superclass_input.to_device(sd.device())?);
        let mut params = BTreeMap::from([(EMBEDDING.to_string(), c.embedding.clone())]);
        for (layer, o) in &c.value_outputs {
            params.insert(format!("{layer}.{VALUE_OUTPUT}"), o.clone());
        }
        Ok(params)
    }
}
