//! Finding a model on disk: a diffusers folder, or a repo id in the Hugging Face cache.
//!
//! The cache is the one `huggingface_hub` writes: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//! `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`; a repo `ORG/NAME` lives in
//! `models--ORG--NAME/snapshots/<commit>/`, and `refs/<revision>` names the commit.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The Hugging Face hub cache directory, as `huggingface_hub` resolves it.
pub fn hf_hub_cache() -> Option<PathBuf> {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    env("HF_HUB_CACHE")
        .or_else(|| env("HUGGINGFACE_HUB_CACHE"))
        .or_else(|| env("HF_HOME").map(|h| h.join("hub")))
        .or_else(|| env("XDG_CACHE_HOME").map(|c| c.join("huggingface").join("hub")))
        .or_else(|| dirs::home_dir().map(|h| h.join(".cache").join("huggingface").join("hub")))
}

/// True when `spec` reads as `ORG/NAME` or `ORG/NAME@REVISION`.
fn looks_like_repo_id(spec: &str) -> bool {
    let id = spec.split('@').next().unwrap_or(spec);
    let parts: Vec<&str> = id.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

/// Resolves `spec` (a folder, or a repo id such as `stable-diffusion-v1-5/stable-diffusion-v1-5`,
/// optionally `@revision`) to a model folder.
pub fn resolve_model(spec: &str) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if path.is_file() {
        return Err(Error::Unsupported(format!(
            "{spec} is a file but not a checkpoint (.safetensors, or a pickled .ckpt to convert): \
             give a checkpoint or a diffusers folder (with model_index.json, unet/, vae/, ...)"
        )));
    }
    if !looks_like_repo_id(spec) {
        return Err(Error::ModelNotFound(format!(
            "{spec}: no such folder (and not a repo id like ORG/NAME)"
        )));
    }
    let cache = hf_hub_cache().ok_or_else(|| {
        Error::ModelNotFound(format!(
            "{spec}: no folder of that name and no home directory for the Hugging Face cache"
        ))
    })?;
    snapshot_in_cache(&cache, spec)
}

/// The snapshot folder of repo `spec` (`ORG/NAME[@REVISION]`) in the cache at `cache`.
pub fn snapshot_in_cache(cache: &Path, spec: &str) -> Result<PathBuf> {
    let (id, revision) = match spec.split_once('@') {
        Some((id, rev)) => (id, rev),
        None => (spec, "main"),
    };
    let repo = cache.join(format!("models--{}", id.replace('/', "--")));
    if !repo.is_dir() {
        return Err(Error::ModelNotFound(format!(
            "{spec}: no folder of that name, and not in the Hugging Face cache (looked for {}). \
             Download it first, e.g. `huggingface-cli download {id}`, or give a folder path",
            repo.display()
        )));
    }
    let snapshots = repo.join("snapshots");
    let ref_file = repo.join("refs").join(revision);
    let commit = if ref_file.is_file() {
        std::fs::read_to_string(&ref_file)
            .map_err(|e| Error::io(&ref_file, e))?
            .trim()
            .to_string()
    } else {
        revision.to_string()
    };
    let snap = snapshots.join(&commit);
    if snap.is_dir() {
        return Ok(snap);
    }
    // No ref for the default revision: accept the only snapshot there is.
    let found: Vec<PathBuf> = std::fs::read_dir(&snapshots)
        .map_err(|e| Error::io(&snapshots, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    match found.as_slice() {
        [only] if revision == "main" => Ok(only.clone()),
        _ => Err(Error::ModelNotFound(format!(
            "{spec}: revision `{revision}` is not in {} ({} snapshots there)",
            snapshots.display(),
            found.len()
        ))),
    }
}

/// The config and weight files of one model component.
#[derive(Debug, Clone)]
pub struct ComponentFiles {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub weights: Vec<PathBuf>,
}

/// Every file an SD1.x pipeline in diffusers layout needs.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub root: PathBuf,
    pub tokenizer: PathBuf,
    pub text_encoder: ComponentFiles,
    pub unet: ComponentFiles,
    pub vae: ComponentFiles,
    /// `scheduler/scheduler_config.json`, when the folder has one (SD1.5's schedule otherwise).
    pub scheduler: Option<PathBuf>,
}

impl ModelFiles {
    /// Finds the files of the model in `root`. With `prefer_fp16`, `*.fp16.safetensors` variants
    /// are taken where they exist.
    pub fn locate(root: &Path, prefer_fp16: bool) -> Result<Self> {
        if !root.is_dir() {
            return Err(Error::ModelNotFound(format!(
                "{} is not a folder",
                root.display()
            )));
        }
        check_pipeline(root)?;
        let sub = |name: &str| -> Result<PathBuf> {
            let d = root.join(name);
            if d.is_dir() {
                Ok(d)
            } else {
                Err(Error::ModelNotFound(format!(
                    "{} has no `{name}/` folder: is it a Stable Diffusion model in diffusers layout?",
                    root.display()
                )))
            }
        };
        let component = |name: &str, stem: &str| -> Result<ComponentFiles> {
            let dir = sub(name)?;
            let config = dir.join("config.json");
            if !config.is_file() {
                return Err(Error::io(
                    &config,
                    std::io::Error::new(std::io::ErrorKind::NotFound, "config.json not found"),
                ));
            }
            let weights = find_weights(&dir, stem, prefer_fp16)?;
            Ok(ComponentFiles {
                dir,
                config,
                weights,
            })
        };
        let scheduler = root.join("scheduler").join("scheduler_config.json");
        Ok(Self {
            root: root.to_path_buf(),
            tokenizer: sub("tokenizer")?,
            text_encoder: component("text_encoder", "model")?,
            unet: component("unet", "diffusion_pytorch_model")?,
            vae: component("vae", "diffusion_pytorch_model")?,
            scheduler: scheduler.is_file().then_some(scheduler),
        })
    }
}

/// The pipeline classes whose folders hold an SD1.x text-to-image model.
const SD1_PIPELINES: &[&str] = &["StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"];

/// Reads `model_index.json`: the folder must be a diffusers pipeline of an SD1.x class.
fn check_pipeline(root: &Path) -> Result<()> {
    let path = root.join("model_index.json");
    if !path.is_file() {
        return Err(Error::ModelNotFound(format!(
            "{} has no model_index.json: not a diffusers pipeline folder (save one with \
             `pipe.save_pretrained(DIR)`)",
            root.display()
        )));
    }
    let index: serde_json::Value = crate::sd::config::read_json(&path)?;
    let class = index
        .get("_class_name")
        .and_then(|c| c.as_str())
        .ok_or_else(|| Error::config(&path, "no `_class_name`: not a diffusers pipeline index"))?;
    if !SD1_PIPELINES.contains(&class) {
        return Err(Error::Unsupported(format!(
            "{} is a {class} folder; only Stable Diffusion 1.x pipelines ({}) are supported",
            root.display(),
            SD1_PIPELINES.join(", ")
        )));
    }
    Ok(())
}

/// The safetensors files of a component: `STEM[.fp16].safetensors`, or the shards listed in
/// `STEM.safetensors.index[.fp16].json`.
pub fn find_weights(dir: &Path, stem: &str, prefer_fp16: bool) -> Result<Vec<PathBuf>> {
    let plain = [
        format!("{stem}.safetensors"),
        format!("{stem}.safetensors.index.json"),
    ];
    let fp16 = [
        format!("{stem}.fp16.safetensors"),
        format!("{stem}.safetensors.index.fp16.json"),
    ];
    let order: Vec<&String> = if prefer_fp16 {
        fp16.iter().chain(plain.iter()).collect()
    } else {
        plain.iter().chain(fp16.iter()).collect()
    };
    for name in order {
        let p = dir.join(name);
        if !p.is_file() {
            continue;
        }
        if name.ends_with(".json") {
            return shards_of(&p);
        }
        return Ok(vec![p]);
    }
    if let Some(pickle) = pickled_weights(dir) {
        return Err(Error::Unsupported(format!(
            "{} holds only pickled PyTorch weights ({}), which are never unpickled here (they \
             can run code): convert the model to safetensors once, e.g. with diffusers' \
             `StableDiffusionPipeline.from_pretrained(DIR).save_pretrained(NEW_DIR)`",
            dir.display(),
            pickle.display()
        )));
    }
    Err(Error::ModelNotFound(format!(
        "no weights in {} (looked for {stem}.safetensors and {stem}.fp16.safetensors)",
        dir.display()
    )))
}

/// A pickled weights file in `dir` (`pytorch_model.bin`, `diffusion_pytorch_model.bin`, ...).
fn pickled_weights(dir: &Path) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e, "bin" | "ckpt" | "pt" | "pth"))
        })
        .collect();
    found.sort();
    found.into_iter().next()
}

fn shards_of(index: &Path) -> Result<Vec<PathBuf>> {
    let v: serde_json::Value = crate::sd::config::read_json(index)?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::config(index, "no `weight_map` object"))?;
    let mut files: Vec<String> = map
        .values()
        .filter_map(|f| f.as_str().map(str::to_string))
        .collect();
    files.sort();
    files.dedup();
    let dir = index.parent().unwrap_or(Path::new("."));
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}
