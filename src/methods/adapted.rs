//! Concepts of the other methods, as a session holds them: a learned word (Textual Inversion),
//! a LoRA, a fine-tuned UNet (DreamBooth). What they change in C is put together by
//! [`crate::customize::side`].

use candle_core::Tensor;

use super::files::{Embedding, Lora, Provenance};
use crate::error::Result;

/// A fine-tuned copy of the model's UNet (DreamBooth's result), shared.
#[derive(Clone)]
pub struct TunedUnet {
    pub unet: std::sync::Arc<crate::sd::unet::UNet>,
    /// Its parameters.
    pub n_params: usize,
    /// The `unet/` folder it was saved in or read from.
    pub dir: Option<std::path::PathBuf>,
    /// Its weights by name, when trained in the session (plain values, shared with `unet`'s),
    /// so that it can be saved; `None` when read from `dir`.
    pub weights: Option<std::sync::Arc<std::collections::BTreeMap<String, Tensor>>>,
}

impl std::fmt::Debug for TunedUnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TunedUnet({} parameters, {:?})", self.n_params, self.dir)
    }
}

/// What a concept of another method changes.
#[derive(Debug, Clone)]
pub enum Change {
    /// A learned word in place of the class word.
    TextualInversion(Embedding),
    /// A LoRA of strength `scale`; C's prompt says `trigger word` (DreamBooth's identifier,
    /// e.g. "sks cat") where F's says the word.
    Lora {
        lora: Lora,
        scale: f64,
        trigger: Option<String>,
    },
    /// DreamBooth: C runs a fine-tuned UNet; its prompt says `trigger word`.
    DreamBooth { unet: TunedUnet, trigger: String },
}

/// Where a concept came from, when known: the model it was trained on and for how long.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Origin {
    /// The fingerprint of that model's UNet.
    pub base_model: Option<String>,
    pub train_steps: Option<usize>,
}

/// A concept of another method, as a session holds it.
#[derive(Debug, Clone)]
pub struct Adapted {
    /// What prompts call it: `<name>`.
    pub name: String,
    /// The class word F sees.
    pub word: String,
    pub change: Change,
    pub origin: Origin,
}

impl Adapted {
    /// `textual_inversion` or `lora`.
    pub fn method(&self) -> &'static str {
        match self.change {
            Change::TextualInversion(_) => "textual_inversion",
            Change::Lora { .. } => "lora",
            Change::DreamBooth { .. } => "dreambooth",
        }
    }

    /// The words C's prompt holds in place of the class word.
    pub fn c_words(&self) -> String {
        match &self.change {
            Change::Lora {
                trigger: Some(t), ..
            }
            | Change::DreamBooth { trigger: t, .. } => format!("{t} {}", self.word),
            _ => self.word.clone(),
        }
    }

    /// What its files record of it (see [`Provenance`]).
    pub fn provenance(&self) -> Provenance {
        let (trigger, rank) = match &self.change {
            Change::TextualInversion(_) => (None, None),
            Change::Lora { lora, trigger, .. } => {
                (trigger.clone(), lora.layers.first().map(|l| l.rank()))
            }
            Change::DreamBooth { trigger, .. } => (Some(trigger.clone()), None),
        };
        Provenance {
            method: Some(self.method().to_string()),
            name: Some(self.name.clone()),
            word: Some(self.word.clone()),
            trigger,
            rank,
            base_model: self.origin.base_model.clone(),
            train_steps: self.origin.train_steps,
        }
    }

    /// Writes it in the layout diffusers reads: a DreamBooth UNet as a `unet/` folder (see
    /// [`super::files::write_unet_folder`]), a learned word as `learned_embeds.safetensors`
    /// (`{"<name>": [n, width]}`, what `load_textual_inversion` takes), a LoRA as
    /// `save_lora_weights` writes it (`unet.MODULE.lora.down.weight` / `.lora.up.weight`, for
    /// `load_lora_weights`), with its [`Provenance`] in the metadata. Atomically.
    pub fn save(&self, path: &std::path::Path) -> Result<()> {
        let cpu = |t: &Tensor| -> Result<Tensor> {
            Ok(t.to_dtype(candle_core::DType::F32)?
                .to_device(&candle_core::Device::Cpu)?
                .contiguous()?)
        };
        let (tensors, meta): (Vec<(String, Tensor)>, _) = match &self.change {
            Change::TextualInversion(e) => (
                vec![(format!("<{}>", self.name), cpu(&e.vectors)?)],
                std::collections::HashMap::from([("format".to_string(), "pt".to_string())]),
            ),
            Change::DreamBooth { unet, .. } => return self.save_unet(unet, path),
            Change::Lora { lora, .. } => {
                if lora.layout == super::files::LoraLayout::Kohya {
                    return Err(crate::error::Error::Unsupported(format!(
                        "<{}> was read from a kohya file: copy that file instead",
                        self.name
                    )));
                }
                let mut t = vec![];
                for l in &lora.layers {
                    let model = match l.target {
                        super::files::LoraTarget::Unet => "unet",
                        super::files::LoraTarget::TextEncoder => "text_encoder",
                    };
                    // kohya's alpha, folded into the up factor (these names carry none).
                    let up = (cpu(&l.up)? * l.alpha_scale())?;
                    t.push((
                        format!("{model}.{}.lora.down.weight", l.module),
                        cpu(&l.down)?,
                    ));
                    t.push((format!("{model}.{}.lora.up.weight", l.module), up));
                }
                (t, std::collections::HashMap::new())
            }
        };
        let mut meta = meta;
        meta.extend(self.provenance().to_metadata());
        let bytes = safetensors::serialize(tensors, Some(meta))
            .map_err(|e| crate::error::Error::arg("concept", e.to_string()))?;
        crate::util::fs::write_atomic(path, |w| {
            w.write_all(&bytes)
                .map_err(|e| crate::error::Error::io(path, e))
        })
    }

    /// A DreamBooth UNet saved as a `unet/` folder at `dir`: written from the session's
    /// weights, or copied from the folder it was read from.
    fn save_unet(&self, unet: &TunedUnet, dir: &std::path::Path) -> Result<()> {
        use super::files::write_unet_folder;
        let provenance = self.provenance();
        if let Some(weights) = &unet.weights {
            return write_unet_folder(dir, weights.iter(), unet.unet.config(), &provenance);
        }
        let Some(from) = &unet.dir else {
            return Err(crate::error::Error::Internal(format!(
                "<{}>: a DreamBooth UNet with neither weights nor a folder",
                self.name
            )));
        };
        if from.canonicalize().ok() == dir.canonicalize().ok() {
            // Saved where it was read from: only the record changes.
            return provenance.write_to_folder(dir);
        }
        std::fs::create_dir_all(dir).map_err(|e| crate::error::Error::io(dir, e))?;
        // Every file of the folder (config, weights in whatever variant or shards it has).
        let entries = std::fs::read_dir(from).map_err(|e| crate::error::Error::io(from, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| crate::error::Error::io(from, e))?;
            let src = entry.path();
            if !src.is_file() || entry.file_name() == super::files::DREAMBOOTH_PROVENANCE {
                continue;
            }
            let dst = dir.join(entry.file_name());
            let mut input =
                std::fs::File::open(&src).map_err(|e| crate::error::Error::io(&src, e))?;
            crate::util::fs::write_atomic(&dst, |w| {
                std::io::copy(&mut input, w)
                    .map(|_| ())
                    .map_err(|e| crate::error::Error::io(&src, e))
            })?;
        }
        provenance.write_to_folder(dir)
    }

    /// Bytes of its tensors.
    pub fn size_bytes(&self) -> usize {
        let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        match &self.change {
            Change::TextualInversion(e) => bytes(&e.vectors),
            Change::Lora { lora, .. } => lora
                .layers
                .iter()
                .map(|l| bytes(&l.down) + bytes(&l.up))
                .sum(),
            Change::DreamBooth { unet, .. } => unet.n_params * 4,
        }
    }
}
