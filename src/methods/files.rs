//! What concept files share, whatever their method: a file or folder read once and offered
//! to each method ([`Found`]: never unpickled, told apart by tensor names and metadata), what
//! our own files record of their training ([`Provenance`]), and the diffusers `unet/` folder a
//! fine-tuned UNet is saved as.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// A concept file or folder, read once and offered to each method.
#[derive(Debug)]
pub enum Found {
    /// A safetensors file: its metadata and tensor names (the tensors are read on demand).
    File {
        path: PathBuf,
        data: Vec<u8>,
        meta: HashMap<String, String>,
        keys: Vec<String>,
    },
    Folder(PathBuf),
}

impl Found {
    /// Reads the file (only a regular one: a FIFO would block) or notes the folder at `path`.
    /// A file that is not safetensors, or holds an SDXL concept, is refused here.
    pub fn read(path: &Path) -> Result<Self> {
        if path.is_dir() {
            return Ok(Found::Folder(path.to_path_buf()));
        }
        let data = crate::util::fs::read_regular(path)?;
        let bad = |msg: String| Error::Format {
            path: path.to_path_buf(),
            msg,
        };
        let (_, header) = safetensors::SafeTensors::read_metadata(&data).map_err(|e| {
            bad(
                crate::sd::safetensors_check::diagnose_bytes(&data).unwrap_or_else(|| {
                    format!("not a safetensors file ({e}); concept files are safetensors")
                }),
            )
        })?;
        let meta = header.metadata().clone().unwrap_or_default();
        let mut keys: Vec<String> = header.tensors().keys().cloned().collect();
        keys.sort();
        if let Some(k) = keys.iter().find(|k| {
            k.starts_with("lora_te1_")
                || k.starts_with("lora_te2_")
                || k.starts_with("text_encoder_2.")
                || ["clip_l", "clip_g"].contains(&k.as_str())
        }) {
            return Err(bad(format!(
                "`{k}` belongs to an SDXL concept (two text encoders); this tool adapts SD1.x"
            )));
        }
        Ok(Found::File {
            path: path.to_path_buf(),
            data,
            meta,
            keys,
        })
    }

    pub fn path(&self) -> &Path {
        match self {
            Found::File { path, .. } | Found::Folder(path) => path,
        }
    }

    /// The tensor names of a file (none for a folder).
    pub fn keys(&self) -> &[String] {
        match self {
            Found::File { keys, .. } => keys,
            Found::Folder(_) => &[],
        }
    }

    /// A metadata value of a file.
    pub fn meta(&self, key: &str) -> Option<&str> {
        match self {
            Found::File { meta, .. } => meta.get(key).map(String::as_str),
            Found::Folder(_) => None,
        }
    }

    /// What the file or folder records of its training.
    pub fn provenance(&self) -> Result<Provenance> {
        match self {
            Found::File { meta, .. } => Ok(Provenance::from_metadata(meta)),
            Found::Folder(dir) => Provenance::of_folder(dir),
        }
    }

    /// A file's tensors, on the CPU, by name.
    pub fn tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        match self {
            Found::File { data, .. } => {
                let tensors = candle_core::safetensors::load_buffer(data, &Device::Cpu)
                    .map_err(|e| self.error(format!("its tensors cannot be read: {e}")))?;
                Ok(tensors.into_iter().collect())
            }
            Found::Folder(dir) => Err(Error::arg(
                "concept",
                format!("{} is a folder, not a concept file", dir.display()),
            )),
        }
    }

    /// An error about this file's content.
    pub fn error(&self, msg: String) -> Error {
        Error::Format {
            path: self.path().to_path_buf(),
            msg,
        }
    }

    /// The error of a file or folder no method claims.
    pub fn unclaimed(&self) -> Error {
        match self {
            Found::Folder(dir) => Error::arg(
                "concept",
                format!(
                    "{}: a folder, but neither a diffusers unet/ folder (no \
                     diffusion_pytorch_model.safetensors) nor a Custom Diffusion one (no \
                     pytorch_custom_diffusion_weights.safetensors)",
                    dir.display()
                ),
            ),
            Found::File { keys, .. } => self.error(format!(
                "no known concept layout fits its {} tensors (e.g. {}): expected an \
                 infusion-concept/1 or perfusion-concept/1 file, a Textual Inversion embedding ({{token: [n, width]}} \
                 or `emb_params`) or a LoRA (`...lora.down.weight`, `...lora_A.weight` or \
                 `lora_unet_...lora_down.weight`)",
                keys.len(),
                keys.iter()
                    .take(3)
                    .map(|k| format!("`{k}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }
}

/// Refuses a tensor of integers where learned values belong (an I32 factor or vector read as
/// values is silently wrong).
pub fn check_float(key: &str, t: &Tensor, bad: &dyn Fn(String) -> Error) -> Result<()> {
    if t.dtype().is_float() {
        return Ok(());
    }
    Err(bad(format!(
        "tensor `{key}` holds {:?} integers, not learned values (floats)",
        t.dtype()
    )))
}

/// What our own files record of how a concept was trained: the safetensors metadata of
/// Textual Inversion and LoRA files (keys `infusion_*`, beside diffusers' `format`), the
/// `infusion_concept.json` of a DreamBooth `unet/` folder. diffusers and AUTOMATIC1111 ignore
/// both; other tools' files have none of it, so every field is optional. Loading takes what is
/// recorded as the defaults of what the request leaves out.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Provenance {
    /// `textual_inversion`, `lora`, `dreambooth`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// What prompts call it: `<name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The class word F sees.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub word: Option<String>,
    /// The identifier C's prompt puts before the word (LoRA, DreamBooth).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger: Option<String>,
    /// A LoRA's rank.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank: Option<usize>,
    /// The fingerprint of the UNet it was trained on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_steps: Option<usize>,
}

/// The metadata keys of [`Provenance`] in a safetensors file.
const PROVENANCE_PREFIX: &str = "infusion_";

/// The file beside a DreamBooth UNet's weights that holds its [`Provenance`].
pub const DREAMBOOTH_PROVENANCE: &str = "infusion_concept.json";

impl Provenance {
    /// As safetensors metadata: one `infusion_FIELD` key per recorded field.
    pub fn to_metadata(&self) -> std::collections::HashMap<String, String> {
        let json = serde_json::to_value(self).unwrap_or_default();
        json.as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| {
                let text = match v {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (format!("{PROVENANCE_PREFIX}{k}"), text)
            })
            .collect()
    }

    /// What a safetensors file's metadata records (nothing for other tools' files; a number
    /// that does not parse is left out).
    pub fn from_metadata(meta: &std::collections::HashMap<String, String>) -> Self {
        let text = |k: &str| {
            meta.get(&format!("{PROVENANCE_PREFIX}{k}"))
                .filter(|v| !v.is_empty())
                .cloned()
        };
        let number = |k: &str| text(k).and_then(|v| v.parse().ok());
        Self {
            method: text("method"),
            name: text("name"),
            word: text("word"),
            trigger: text("trigger"),
            rank: number("rank"),
            base_model: text("base_model"),
            train_steps: number("train_steps"),
        }
    }

    /// What a DreamBooth `unet/` folder records (nothing when it has no such file).
    pub fn of_folder(dir: &Path) -> Result<Self> {
        let path = dir.join(DREAMBOOTH_PROVENANCE);
        if !path.exists() {
            return Ok(Self::default());
        }
        let text = crate::util::fs::read_regular(&path)?;
        serde_json::from_slice(&text).map_err(|e| Error::Format {
            path: path.clone(),
            msg: format!("not the record of a DreamBooth run: {e}"),
        })
    }

    /// Writes it as a DreamBooth `unet/` folder's record, atomically.
    pub fn write_to_folder(&self, dir: &Path) -> Result<()> {
        let path = dir.join(DREAMBOOTH_PROVENANCE);
        let text = serde_json::to_vec_pretty(self).map_err(|e| Error::Internal(e.to_string()))?;
        crate::util::fs::write_atomic(&path, |w| {
            w.write_all(&text).map_err(|e| Error::io(&path, e))
        })
    }
}

/// Writes `tensors` with `meta` as a safetensors file at `path`, atomically.
pub fn write_safetensors(
    path: &Path,
    tensors: Vec<(String, Tensor)>,
    meta: HashMap<String, String>,
) -> Result<()> {
    let bytes = safetensors::serialize(tensors, Some(meta))
        .map_err(|e| Error::Internal(format!("serializing {}: {e}", path.display())))?;
    crate::util::fs::write_atomic(path, |w| {
        w.write_all(&bytes).map_err(|e| Error::io(path, e))
    })
}

/// Where a run that saves a folder (a UNet) writes it is checked before training, not found
/// wrong after.
pub fn check_out_folder(out: &Path) -> Result<()> {
    if out.is_file() {
        return Err(Error::arg(
            "out",
            format!(
                "{} is a file; this method writes a folder (a diffusers unet/)",
                out.display()
            ),
        ));
    }
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.is_dir() {
            return Err(Error::arg(
                "out",
                format!("{}: no folder {}", out.display(), parent.display()),
            ));
        }
    }
    Ok(())
}

/// The weights file of a diffusers `unet/` folder.
pub const UNET_WEIGHTS: &str = "diffusion_pytorch_model.safetensors";

/// Writes a DreamBooth result as a diffusers `unet/` folder: `config.json` (`config`, whatever
/// the model's own files were), `diffusion_pytorch_model.safetensors` (f32; what `load_model`'s
/// folders and diffusers' `UNet2DConditionModel.from_pretrained` read) and beside them
/// `infusion_concept.json` ([`Provenance`]). Each file atomically.
pub fn write_unet_folder<'a>(
    dir: &Path,
    tensors: impl Iterator<Item = (&'a String, &'a Tensor)>,
    config: &crate::sd::config::UNetConfig,
    provenance: &Provenance,
) -> Result<()> {
    if dir.is_file() {
        return Err(Error::arg(
            "out",
            format!(
                "{} is a file: a DreamBooth UNet is saved as a folder",
                dir.display()
            ),
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tensors = tensors
        .map(|(k, t)| Ok((k.clone(), t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)))
        .collect::<Result<Vec<_>>>()?;
    let bytes = safetensors::serialize(tensors, None)
        .map_err(|e| Error::Internal(format!("serializing a UNet: {e}")))?;
    let weights = dir.join(UNET_WEIGHTS);
    crate::util::fs::write_atomic(&weights, |w| {
        w.write_all(&bytes).map_err(|e| Error::io(&weights, e))
    })?;
    let text = serde_json::to_vec_pretty(&config.to_diffusers_json())
        .map_err(|e| Error::Internal(format!("a UNet config as JSON: {e}")))?;
    let out = dir.join("config.json");
    crate::util::fs::write_atomic(&out, |w| w.write_all(&text).map_err(|e| Error::io(&out, e)))?;
    provenance.write_to_folder(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provenance_goes_through_metadata_and_skips_what_is_unknown() {
        let p = Provenance {
            method: Some("lora".into()),
            name: Some("pot".into()),
            word: Some("teapot".into()),
            trigger: Some("sks".into()),
            rank: Some(4),
            base_model: Some("sha256:abc".into()),
            train_steps: Some(300),
        };
        let meta = p.to_metadata();
        assert_eq!(meta["infusion_rank"], "4");
        assert_eq!(meta["infusion_word"], "teapot");
        assert_eq!(Provenance::from_metadata(&meta), p);
        let sparse = Provenance {
            word: Some("cat".into()),
            ..Default::default()
        };
        assert_eq!(sparse.to_metadata().len(), 1);
        let mut other = std::collections::HashMap::from([("format".into(), "pt".into())]);
        assert_eq!(Provenance::from_metadata(&other), Provenance::default());
        other.insert("infusion_rank".into(), "four".into());
        assert_eq!(Provenance::from_metadata(&other).rank, None);
    }
}
