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

/// Reads and sorts the concept file at `path`.
pub fn read(path: &Path) -> Result<ConceptFile> {
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
        return Ok(ConceptFile::Infusion);
    }
    let tensors = candle_core::safetensors::load_buffer(&data, &Device::Cpu)
        .map_err(|e| bad(format!("its tensors cannot be read: {e}")))?;
    let tensors: BTreeMap<String, Tensor> = tensors.into_iter().collect();
    sort(path, tensors)
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
        let t = t.to_dtype(DType::F32)?;
        match t.rank() {
            1 => Ok(t.unsqueeze(0)?),
            2 => Ok(t),
            _ => Err(bad(format!(
                "tensor `{k}` has shape {:?}: an embedding is [vectors, width]",
                t.dims()
            ))),
        }
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
    if let Some(orphan) = tensors.keys().find(|k| {
        FACTORS.iter().any(|(_, down, up)| {
            k.ends_with(up) && !tensors.contains_key(&format!("{}{down}", &k[..k.len() - up.len()]))
        })
    }) {
        return Err(bad(format!("`{orphan}` has no down factor")));
    }
    Ok(Lora { layout, layers })
}

/// A factor as a matrix (`[a, b]`, or a 1x1 convolution's `[a, b, 1, 1]`), in f32.
fn factor(t: &Tensor, key: &str, bad: &dyn Fn(String) -> Error) -> Result<Tensor> {
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
