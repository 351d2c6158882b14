//! Half precision: f16 (and, on CUDA, bf16) generation stays close to the f32 reference, with
//! no NaN or infinity; the VAE stays in f32 (`force_upcast`). Tolerances relative to the
//! reference's scale: f16 2e-2 (measured 4e-3 on the CPU), bf16 6e-2 (8 bits of mantissa).
//! bf16 on the CPU is refused with a clear message (candle's CPU matmul has no bf16).

use candle_core::DType;
use infusion_repl::{GenerateOptions, Job, LoadOptions, StableDiffusion};

use crate::common::{assert_close, device, get, max_abs, reference, tiny_model_dir};

pub(crate) fn load(dtype: DType) -> infusion_repl::Result<StableDiffusion> {
    StableDiffusion::load_dir(
        &tiny_model_dir(),
        &LoadOptions {
            device: device(),
            dtype,
        },
    )
}

pub(crate) fn check_close_to_reference(dtype: DType, tol: f32) {
    let sd = load(dtype).unwrap();
    assert_eq!(sd.dtype(), dtype);
    assert_eq!(
        sd.vae_dtype(),
        DType::F32,
        "force_upcast keeps the VAE in f32"
    );
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
    assert!(max_abs(&g.latents).is_finite() && max_abs(&g.image).is_finite());
    let name = format!("{dtype:?}");
    assert_close(
        &g.latents,
        get(&r, "final_latents"),
        tol,
        &format!("{name} final latents"),
    );
    assert_close(&g.image, get(&r, "image_01"), tol, &format!("{name} image"));
}

#[test]
fn f16_generation_is_close_to_the_f32_reference() {
    check_close_to_reference(DType::F16, 2e-2);
}

#[test]
fn bf16_is_close_on_cuda_and_refused_on_the_cpu() {
    if device().is_cpu() {
        let e = load(DType::BF16)
            .err()
            .expect("bf16 on the CPU is refused")
            .to_string();
        assert!(e.contains("bf16") && e.contains("f32"), "{e}");
    } else {
        check_close_to_reference(DType::BF16, 6e-2);
    }
}
