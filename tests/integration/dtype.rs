//! Half precision on the CPU: f16 generation stays close to the f32 reference (tolerance stated
//! below, measured 4e-3 on this model), the VAE stays in f32 (`force_upcast`), and bf16 on the
//! CPU is refused with a clear message (candle's CPU matmul has no bf16).

use candle_core::DType;
use infusion::{GenerateOptions, Job, LoadOptions, StableDiffusion};

use crate::common::{assert_close, get, max_abs, reference, tiny_model_dir};

#[test]
fn f16_generation_is_close_to_the_f32_reference() {
    let sd = StableDiffusion::load_dir(
        &tiny_model_dir(),
        &LoadOptions {
            dtype: DType::F16,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(sd.dtype(), DType::F16);
    let r = reference("txt2img.safetensors");
    let opts = GenerateOptions {
        steps: 5,
        guidance: 7.5,
        noise: Some(get(&r, "init_noise").clone()),
        ..Default::default()
    };
    let g = sd
        .generate("a photo of a cat sitting by a teapot", &opts, &Job::quiet())
        .unwrap();
    assert!(max_abs(&g.latents).is_finite());
    assert_close(
        &g.latents,
        get(&r, "final_latents"),
        2e-2,
        "f16 final latents",
    );
    assert_close(&g.image, get(&r, "image_01"), 2e-2, "f16 image");
}

#[test]
fn bf16_on_the_cpu_is_refused_clearly() {
    let e = StableDiffusion::load_dir(
        &tiny_model_dir(),
        &LoadOptions {
            dtype: DType::BF16,
            ..Default::default()
        },
    )
    .err()
    .expect("bf16 on the CPU is refused")
    .to_string();
    assert!(e.contains("bf16") && e.contains("f32"), "{e}");
}
