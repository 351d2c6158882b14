//! The concept files users already have, told apart by their tensors' names and metadata (never
//! by unpickling):
//! - ours, `infusion-concept/1` (read by the Infusion loader);
//! - Textual Inversion: diffusers' `learned_embeds.safetensors` (`{token: [n, width]}`) and
//!   AUTOMATIC1111's embeddings (`emb_params: [n, width]`, the token named after the file);
//! - LoRA: diffusers' `save_lora_weights` layout (`unet.MODULE.lora.down.weight` /
//!   `.lora.up.weight`), PEFT's (`.lora_A.weight` / `.lora_B.weight`, with or without `unet.`),
//!   and kohya's / AUTOMATIC1111's (`lora_unet_MODULE.lora_down.weight`, `.lora_up.weight`,
//!   `.alpha`, MODULE with `_` for `.`; `lora_te_` for the text encoder).
//!
//! Names are checked against a model when a concept is applied (a LoRA's module and shapes, a
//! vector's width); here a file is read and sorted, and one that fits no layout is refused with
//! what it holds.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// What a concept file holds.
#[derive(Debug)]
pub enum ConceptFile {
    /// Our own `infusion-concept/1` file: the Infusion loader reads it.
    Infusion,
    TextualInversion(Embedding),
    Lora(Lora),
}

/// A Textual Inversion embedding: `vectors` (n, width) stand for one new word.
#[derive(Debug, Clone)]
pub struct Embedding {
    /// The token the file names (diffusers' key; A1111's files are named after the file).
    pub token: String,
    pub vectors: Tensor,
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
pub struct Lora {
    pub layout: LoraLayout,
    pub layers: Vec<LoraLayer>,
}

impl Lora {
    pub fn unet_layers(&self) -> impl Iterator<Item = &LoraLayer> {
        self.layers.iter().filter(|l| l.target == LoraTarget::Unet)
    }

    pub fn text_encoder_layers(&self) -> impl Iterator<Item = &LoraLayer> {
        self.layers
            .iter()
            .filter(|l| l.target == LoraTarget::TextEncoder)
    }
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

/// Reads and sorts the concept file at `path`.
pub fn read(path: &Path) -> Result<ConceptFile> {
    Ok(read_with_provenance(path)?.0)
}

/// [`read`], with what the file records of its training.
pub fn read_with_provenance(path: &Path) -> Result<(ConceptFile, Provenance)> {
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
    if meta
        .get("format")
        .is_some_and(|f| f.starts_with("infusion-concept"))
    {
        return Ok((ConceptFile::Infusion, Provenance::default()));
    }
    let tensors = candle_core::safetensors::load_buffer(&data, &Device::Cpu)
        .map_err(|e| bad(format!("its tensors cannot be read: {e}")))?;
    let tensors: BTreeMap<String, Tensor> = tensors.into_iter().collect();
    Ok((sort(path, tensors)?, Provenance::from_metadata(&meta)))
}

/// The kind of file `tensors` (named as in the file at `path`) make.
fn sort(path: &Path, tensors: BTreeMap<String, Tensor>) -> Result<ConceptFile> {
    let bad = |msg: String| Error::Format {
        path: path.to_path_buf(),
        msg,
    };
    let keys: Vec<&String> = tensors.keys().collect();
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
    if keys.iter().any(|k| k.contains("lora")) {
        return Ok(ConceptFile::Lora(lora(path, tensors)?));
    }
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
        let token = path
            .file_stem()
            .map_or_else(|| "embedding".into(), |s| s.to_string_lossy().into_owned());
        return Ok(ConceptFile::TextualInversion(Embedding {
            token,
            vectors: as_vectors("emb_params", t)?,
        }));
    }
    if tensors.len() == 1 {
        let (token, t) = tensors.iter().next().expect("one tensor");
        return Ok(ConceptFile::TextualInversion(Embedding {
            token: token.clone(),
            vectors: as_vectors(token, t)?,
        }));
    }
    Err(bad(format!(
        "no known concept layout fits its {} tensors (e.g. {}): expected an infusion-concept/1 \
         file, a Textual Inversion embedding ({{token: [n, width]}} or `emb_params`) or a LoRA \
         (`...lora.down.weight`, `...lora_A.weight` or `lora_unet_...lora_down.weight`)",
        keys.len(),
        keys.iter()
            .take(3)
            .map(|k| format!("`{k}`"))
            .collect::<Vec<_>>()
            .join(", ")
    )))
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

/// A LoRA file's layers, each with both factors (and kohya's alpha).
fn lora(path: &Path, tensors: BTreeMap<String, Tensor>) -> Result<Lora> {
    let bad = |msg: String| Error::Format {
        path: path.to_path_buf(),
        msg,
    };
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
    Ok(Lora { layout, layers })
}

/// Refuses a tensor of integers where learned values belong (an I32 factor or vector read as
/// values is silently wrong).
fn check_float(key: &str, t: &Tensor, bad: &dyn Fn(String) -> Error) -> Result<()> {
    if t.dtype().is_float() {
        return Ok(());
    }
    Err(bad(format!(
        "tensor `{key}` holds {:?} integers, not learned values (floats)",
        t.dtype()
    )))
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
