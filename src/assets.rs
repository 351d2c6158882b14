//! Where the files shipped with the tool are: the tiny random-weight models (SD, CLIP, DINO), the
//! CLIP vocabulary and the Rhai stdlib.

use std::path::{Path, PathBuf};

/// The folder of bundled files: `$INFUSION_HOME`, else the source checkout the binary was built
/// from, else the current folder (a copied checkout, e.g. on a GPU machine).
pub fn home() -> PathBuf {
    if let Some(h) = std::env::var_os("INFUSION_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    let built = Path::new(env!("CARGO_MANIFEST_DIR"));
    if built.join("models").is_dir() {
        built.to_path_buf()
    } else {
        PathBuf::from(".")
    }
}

/// Where [`home`] looked, for an error about a bundled file that is not there.
pub fn where_home() -> String {
    match std::env::var_os("INFUSION_HOME").filter(|h| !h.is_empty()) {
        Some(h) => format!(
            "INFUSION_HOME={} does not hold this tool's models/ and stdlib/ (unset it, or point \
             it at the folder that does)",
            PathBuf::from(h).display()
        ),
        None => format!(
            "the tool looks in the folder it was built from ({}), then the current folder: set \
             INFUSION_HOME to the folder holding models/ and stdlib/",
            env!("CARGO_MANIFEST_DIR")
        ),
    }
}

/// The tiny SD1.x model with random weights, in diffusers layout.
pub fn tiny_sd() -> PathBuf {
    home().join("models").join("tiny-sd")
}

/// The tiny CLIP with random weights (Hugging Face layout).
pub fn tiny_clip() -> PathBuf {
    home().join("models").join("tiny-clip")
}

/// The tiny DINO ViT with random weights (Hugging Face layout).
pub fn tiny_dino() -> PathBuf {
    home().join("models").join("tiny-dino")
}

/// The CLIP tokenizer files (vocab.json, merges.txt) SD1.x uses.
pub fn clip_tokenizer() -> PathBuf {
    tiny_sd().join("tokenizer")
}

/// The Rhai modules recipes import: `$INFUSION_STDLIB`, else `stdlib/` beside the models.
pub fn stdlib() -> PathBuf {
    std::env::var_os("INFUSION_STDLIB")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join("stdlib"))
}
