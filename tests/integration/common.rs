//! Helpers shared by the integration tests.
//!
//! Reference tensors come from `tests/fixtures/reference` (copied from the shared fixtures,
//! made by diffusers 0.42.1 / transformers 5.17.0 / torch 2.11 on CPU in float32; see
//! `tests/fixtures/README.md`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use infusion_repl::sd::Kernels;
use infusion_repl::{LoadOptions, StableDiffusion};

/// The checkout's root (see `infusion_repl::assets::home`: a test binary copied to another machine
/// finds the fixtures in the current folder).
pub fn repo() -> PathBuf {
    infusion_repl::assets::home()
}

/// Copies folder `src` to `dst`, recursively.
pub fn copy_dir(src: &std::path::Path, dst: &std::path::Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), &to).unwrap();
        }
    }
}

pub fn tiny_model_dir() -> PathBuf {
    repo().join("models").join("tiny-sd")
}

/// The device parity tests run on: `INFUSION_TEST_DEVICE` (`cpu`, the default, or `cuda[:N]`),
/// so the GPU check runs the same tests on CUDA.
pub fn device() -> Device {
    match std::env::var("INFUSION_TEST_DEVICE") {
        Ok(d) if !d.is_empty() => {
            infusion_repl::sd::parse_device(&d).expect("INFUSION_TEST_DEVICE")
        }
        _ => Device::Cpu,
    }
}

/// Reference tensors, on the test device.
pub fn reference(name: &str) -> HashMap<String, Tensor> {
    let path = repo().join("tests/fixtures/reference").join(name);
    infusion_repl::sd::load_safetensors(&path, &device())
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

pub fn get<'a>(t: &'a HashMap<String, Tensor>, name: &str) -> &'a Tensor {
    t.get(name)
        .unwrap_or_else(|| panic!("reference tensor `{name}` missing"))
}

/// The tiny model, loaded once per test binary (on the test device, f32, naive kernels).
pub fn tiny() -> &'static StableDiffusion {
    tiny_with(Kernels::Naive)
}

/// The tiny model loaded with `kernels`, once per test binary and choice (on the test device,
/// f32).
pub fn tiny_with(kernels: Kernels) -> &'static StableDiffusion {
    static NAIVE: OnceLock<StableDiffusion> = OnceLock::new();
    static FUSED: OnceLock<StableDiffusion> = OnceLock::new();
    let cell = match kernels {
        Kernels::Naive => &NAIVE,
        Kernels::Fused => &FUSED,
    };
    cell.get_or_init(|| {
        let opts = LoadOptions {
            device: device(),
            kernels,
            ..Default::default()
        };
        StableDiffusion::load_dir(&tiny_model_dir(), &opts).expect("the bundled tiny model loads")
    })
}

pub fn max_abs(t: &Tensor) -> f32 {
    t.to_dtype(DType::F32)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Asserts max|actual - expected| <= tol * max(1, max|expected|) (the fixtures' README
/// tolerance form) and returns the error relative to that scale.
#[track_caller]
pub fn assert_close(actual: &Tensor, expected: &Tensor, tol: f32, what: &str) -> f32 {
    let actual = actual
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let expected = expected
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    assert_eq!(
        actual.dims(),
        expected.dims(),
        "{what}: shape {:?} vs reference {:?}",
        actual.dims(),
        expected.dims()
    );
    let err = max_abs(&(&actual - &expected).unwrap());
    let scale = max_abs(&expected).max(1.0);
    let rel = err / scale;
    eprintln!("{what}: relative error {rel:e} (tolerance {tol:e})");
    assert!(
        rel <= tol,
        "{what}: max abs error {err:e} = {rel:e} x scale {scale}, tolerance {tol:e}"
    );
    rel
}

pub fn ids_tensor(ids: &Tensor) -> Tensor {
    ids.to_dtype(DType::U32).unwrap()
}

/// The bundled tiny CLIP and DINO, on the test device.
pub fn tiny_scorers() -> (infusion_repl::metrics::Clip, infusion_repl::metrics::Dino) {
    let clip = infusion_repl::metrics::Clip::load(
        &repo().join("models/tiny-clip"),
        &repo().join("models/tiny-sd/tokenizer"),
        &device(),
    )
    .expect("the bundled tiny CLIP loads");
    let dino = infusion_repl::metrics::Dino::load(&repo().join("models/tiny-dino"), &device())
        .expect("the bundled tiny DINO loads");
    (clip, dino)
}

/// Runs the binary with `args` in `cwd` (no `INFUSION_MODEL` from the environment: the bundled
/// model unless `--model` is given).
pub fn run_bin(args: &[&str], cwd: &std::path::Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_infusion-repl"))
        .args(args)
        .current_dir(cwd)
        .env_remove("INFUSION_MODEL")
        .output()
        .expect("infusion-repl runs")
}

/// A finished process's standard error, as text.
pub fn stderr_of(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
