//! Concepts: a name, a class word, and one residual Δ per cross-attention layer in that layer's
//! value space.
//!
//! File format (`infusion-concept/1`), safetensors:
//! - one 1-D tensor per cross-attention layer, named by the layer's weight path
//!   (`down_blocks.0.attentions.0.transformer_blocks.0.attn2`), f16 or f32, length = the layer's
//!   inner dim (`to_v` output features);
//! - metadata: `format` = `infusion-concept/1`, `name`, `word`, `base_model` (the fingerprint of
//!   the UNet weights it was trained on), `created` (RFC 3339, UTC), `train` (JSON of the training
//!   settings).
//!
//! Files are written atomically (temporary file + rename).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::error::root_cause;
use crate::error::{Error, Result};
use crate::job::Job;
use crate::sd::attention::{AttnKind, LayerInfo};
use crate::sd::pipeline::StableDiffusion;
use crate::util::fs::write_atomic;
use crate::util::names::{check_name, check_word};

/// The `format` metadata value this version writes and reads.
pub const FORMAT: &str = "infusion-concept/1";

/// A learned concept.
#[derive(Debug, Clone)]
pub struct Concept {
    /// What prompts call it: `<name>`.
    pub name: String,
    /// The class word the foundational pipeline sees in its place (`cat`).
    pub word: String,
    /// Layer path -> Δ, 1-D, f32, on the CPU.
    pub deltas: BTreeMap<String, Tensor>,
    /// Fingerprint of the UNet the concept was trained on (`None` for files without one).
    pub base_model: Option<String>,
    /// When the concept was created (RFC 3339).
    pub created: String,
    /// The training settings (JSON).
    pub train: serde_json::Value,
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

impl Concept {
    /// A concept with Δ = 0 in every cross-attention layer of `layers`.
    pub fn zeros<'a>(
        name: &str,
        word: &str,
        layers: impl IntoIterator<Item = &'a LayerInfo>,
        base_model: Option<String>,
    ) -> Result<Self> {
        check_name(name)?;
        check_word(word)?;
        let deltas = layers
            .into_iter()
            .filter(|l| l.kind == AttnKind::CrossAttention)
            .map(|l| {
                Ok((
                    l.path.clone(),
                    Tensor::zeros(l.inner_dim(), DType::F32, &Device::Cpu)?,
                ))
            })
            .collect::<Result<BTreeMap<_, _>>>()?;
        Ok(Self {
            name: name.to_string(),
            word: word.trim().to_string(),
            deltas,
            base_model,
            created: now_rfc3339(),
            train: serde_json::Value::Null,
        })
    }

    /// Number of Δ values over all layers.
    pub fn n_values(&self) -> usize {
        self.deltas.values().map(|t| t.elem_count()).sum()
    }

    /// The file's bytes, with Δ stored in `dtype` (f16 or f32).
    pub fn to_bytes(&self, dtype: DType) -> Result<Vec<u8>> {
        if !matches!(dtype, DType::F16 | DType::F32) {
            return Err(Error::arg(
                "dtype",
                format!("{dtype:?}: concepts are stored in f16 or f32"),
            ));
        }
        let tensors = self
            .deltas
            .iter()
            .map(|(k, t)| Ok((k.clone(), t.to_dtype(dtype)?)))
            .collect::<Result<Vec<_>>>()?;
        let mut meta = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("name".to_string(), self.name.clone()),
            ("word".to_string(), self.word.clone()),
            ("created".to_string(), self.created.clone()),
            ("train".to_string(), self.train.to_string()),
        ]);
        if let Some(b) = &self.base_model {
            meta.insert("base_model".to_string(), b.clone());
        }
        safetensors::serialize(tensors, Some(meta))
            .map_err(|e| Error::Internal(format!("cannot serialize the concept: {e}")))
    }

    /// Saves the concept at `path` (atomically), Δ in `dtype` (f16 or f32).
    pub fn save(&self, path: &Path, dtype: DType) -> Result<()> {
        let bytes = self.to_bytes(dtype)?;
        write_atomic(path, |w| {
            w.write_all(&bytes).map_err(|e| Error::io(path, e))
        })
    }

    /// Reads a concept file, checking its format and that every tensor is a finite 1-D vector
    /// named like a cross-attention layer. Whether it fits a model is [`Concept::check_model`].
    pub fn load(path: &Path) -> Result<Self> {
        let data = crate::util::fs::read_regular(path)?;
        Self::from_bytes(&data, path)
    }

    /// Parses a concept file's bytes; `path` is for messages.
    pub fn from_bytes(data: &[u8], path: &Path) -> Result<Self> {
        let unreadable = |msg: String| Error::Safetensors {
            path: path.to_path_buf(),
            msg,
        };
        // What is wrong inside a readable file is said as it is.
        let bad = |msg: String| Error::Format {
            path: path.to_path_buf(),
            msg: format!("not a usable concept: {msg}"),
        };
        let st = safetensors::SafeTensors::deserialize(data).map_err(|e| {
            let why = crate::sd::safetensors_check::diagnose_bytes(data).unwrap_or(e.to_string());
            unreadable(format!("not a concept file: {why}"))
        })?;
        let (_, header) = safetensors::SafeTensors::read_metadata(data)
            .map_err(|e| unreadable(format!("not a concept file: {e}")))?;
        let meta = header.metadata().clone().unwrap_or_default();
        match meta.get("format").map(String::as_str) {
            Some(FORMAT) => {}
            Some(other) => {
                return Err(bad(format!(
                    "format `{other}` is not supported (this version reads `{FORMAT}`)"
                )))
            }
            None => return Err(bad(format!("no `format` metadata: not an {FORMAT} file"))),
        }
        let field = |k: &str| {
            meta.get(k)
                .cloned()
                .ok_or_else(|| bad(format!("metadata `{k}` is missing")))
        };
        let name = field("name")?;
        check_name(&name).map_err(|e| bad(e.to_string()))?;
        let word = field("word")?;
        check_word(&word).map_err(|_| bad("its class word (metadata `word`) is empty".into()))?;
        for (k, view) in st.tensors() {
            if !matches!(
                view.dtype(),
                safetensors::Dtype::F16 | safetensors::Dtype::F32
            ) {
                return Err(bad(format!(
                    "tensor `{k}` is {:?}; concept residuals are f16 or f32",
                    view.dtype()
                )));
            }
        }
        let train = match meta.get("train") {
            Some(s) => serde_json::from_str(s)
                .map_err(|e| bad(format!("metadata `train` is not JSON: {e}")))?,
            None => serde_json::Value::Null,
        };
        let tensors = candle_core::safetensors::load_buffer(data, &Device::Cpu)
            .map_err(|e| unreadable(root_cause(&e)))?;
        if tensors.is_empty() {
            return Err(bad("the file holds no Δ tensors".into()));
        }
        let mut deltas = BTreeMap::new();
        for (k, t) in tensors {
            if !k.ends_with(".attn2") {
                return Err(bad(format!(
                    "tensor `{k}` is not named by a cross-attention layer path"
                )));
            }
            if t.rank() != 1 {
                return Err(bad(format!(
                    "tensor `{k}` has shape {:?}, expected a vector",
                    t.dims()
                )));
            }
            let t = t.to_dtype(DType::F32)?;
            let v: Vec<f32> = t.to_vec1()?;
            if v.iter().any(|x| !x.is_finite()) {
                return Err(bad(format!("tensor `{k}` holds NaN or infinite values")));
            }
            deltas.insert(k, t);
        }
        Ok(Self {
            name,
            word,
            deltas,
            base_model: meta.get("base_model").cloned(),
            created: meta.get("created").cloned().unwrap_or_default(),
            train,
        })
    }

    /// Checks that the concept fits a UNet: every cross-attention layer present with its inner
    /// dim, no unknown layer, and the same base model. A concept for another model is refused
    /// unless `force`. Returns warnings (a file without `base_model`, a forced mismatch).
    pub fn check_model<'a>(
        &self,
        layers: impl IntoIterator<Item = &'a LayerInfo>,
        base_model: &str,
        force: bool,
    ) -> Result<Vec<String>> {
        let mut warnings = vec![];
        let err = |msg: String| Error::arg("concept", format!("<{}>: {msg}", self.name));
        let cross: Vec<&LayerInfo> = layers
            .into_iter()
            .filter(|l| l.kind == AttnKind::CrossAttention)
            .collect();
        for l in &cross {
            match self.deltas.get(&l.path) {
                None => return Err(err(format!("no Δ for layer `{}`", l.path))),
                Some(t) if t.elem_count() != l.inner_dim() => {
                    return Err(err(format!(
                        "Δ of layer `{}` has {} values, the model's layer has {}",
                        l.path,
                        t.elem_count(),
                        l.inner_dim()
                    )))
                }
                Some(_) => {}
            }
        }
        if let Some(extra) = self
            .deltas
            .keys()
            .find(|k| !cross.iter().any(|l| &l.path == *k))
        {
            return Err(err(format!("layer `{extra}` is not in this model")));
        }
        match &self.base_model {
            None => warnings.push(format!(
                "<{}> does not say which model it was trained on: loading it anyway",
                self.name
            )),
            Some(b) if b != base_model => {
                let msg = format!("was trained on another model ({b}, this one is {base_model})");
                if force {
                    warnings.push(format!("<{}> {msg}: loading it anyway (forced)", self.name));
                } else {
                    return Err(err(format!("{msg}; force the load to use it anyway")));
                }
            }
            Some(_) => {}
        }
        Ok(warnings)
    }
}

/// [`Concept::check_model`] against `sd`, its warnings reported to `job`.
pub fn check(concept: &Concept, sd: &StableDiffusion, force: bool, job: &Job) -> Result<()> {
    for w in concept.check_model(sd.unet.attention_layers(), sd.unet_fingerprint(), force)? {
        job.warn(w);
    }
    Ok(())
}
