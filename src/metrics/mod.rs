//! The paper's metrics: latent Fisher divergence and the Gaussian 2-Wasserstein distance
//! (overfitting), and CLIP-T, CLIP-I and DINO-I (customization quality).

pub(crate) mod clip;
pub(crate) mod curves;
pub(crate) mod dino;
pub(crate) mod eval;
pub(crate) mod fisher;
pub(crate) mod points;
pub(crate) mod preprocess;
pub(crate) mod scores;
pub(crate) mod w2;

// What the tests, the binary and a library user reach (the files are the crate's own).
pub use clip::{cosine_matrix, Clip};
pub use curves::{chart, overtraining_curves, CurveOptions, CurvePoint};
pub use dino::Dino;
pub use eval::{evaluate, EvalConcept, EvalOptions};
pub use fisher::{fisher_divergence, fisher_inputs, unet_from_file, FisherOptions, Variant};
pub use w2::wasserstein;

use std::path::Path;

use crate::job::Job;

/// The mean and its standard error (0 for one value).
pub fn mean_se(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mean = v.iter().sum::<f64>() / n;
    if v.len() < 2 {
        return (mean, 0.0);
    }
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, (var / n).sqrt())
}

/// Whether the model in `dir` has random weights: a `RANDOM_WEIGHTS` file beside its config, as
/// the bundled tiny models have.
pub fn is_random(dir: &Path) -> bool {
    dir.join("RANDOM_WEIGHTS").is_file()
}

/// How records name a scorer: its folder, marked when its weights are random.
pub fn scorer_label(kind: &str, dir: &Path) -> String {
    let name = dir.file_name().map_or_else(
        || dir.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    if is_random(dir) {
        format!("{kind} {name} (RANDOM weights)")
    } else {
        format!("{kind} {name}")
    }
}

/// Warns, once per folder for the whole process (loading and then scoring with it said it
/// twice), that the `kind` scorer in `dir` has random weights.
pub fn warn_if_random(kind: &str, dir: &Path, job: &Job) {
    static WARNED: std::sync::Mutex<std::collections::BTreeSet<std::path::PathBuf>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    if !is_random(dir) {
        return;
    }
    let first = WARNED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(dir.to_path_buf());
    if first {
        job.warn(format!(
            "the {kind} in {} has RANDOM weights: its scores mean nothing; give a real one \
             (load_clip(DIR) / load_dino(DIR) in scripts, --clip DIR / --dino DIR in recipes)",
            dir.display()
        ));
    }
}

/// The scorers' labels for records, and a loud warning when one has random weights: its
/// scores are noise, and records say so.
pub fn scorers_label(clip: &clip::Clip, dino: &dino::Dino, job: &Job) -> String {
    for (kind, dir) in [("CLIP", clip.path()), ("DINO", dino.path())] {
        warn_if_random(kind, dir, job);
    }
    format!(
        "{}, {}",
        scorer_label("CLIP", clip.path()),
        scorer_label("DINO", dino.path())
    )
}
