//! The fused kernels (`--kernels fused`: attention, group norm + SiLU) through the whole
//! pipeline: text-to-image, half precision, Infusion (C reusing F's cross-attention
//! probabilities) and the training loss with its gradients, each against the same references and
//! tolerances as the unfused path. On the CPU this runs the Rust implementations of the kernels'
//! algorithms; with `INFUSION_TEST_DEVICE=cuda`, the CUDA kernels (attention in f16 and bf16
//! only: f32 attention stays unfused there).
//! The choice is scoped to the test's thread, so the other tests keep the default.

use candle_core::DType;
use infusion_repl::sd::fused::{fused_calls_on_this_thread, with_kernels, Kernels};
use infusion_repl::{generate_pair, Job};

use crate::common::{assert_close, device, get, max_abs, reference, tiny};

fn fused<R>(f: impl FnOnce() -> R) -> R {
    with_kernels(Kernels::Fused, f)
}

#[test]
fn txt2img_matches_the_reference_and_the_unfused_run() {
    let r = reference("txt2img.safetensors");
    let prompt = "a photo of a cat sitting by a teapot";
    let opts = crate::txt2img::options(&r);
    let calls = fused_calls_on_this_thread();
    let g = fused(|| tiny().generate(prompt, &opts, &Job::quiet())).unwrap();
    // Every attention layer ran fused at each of the 5 steps (both CFG rows in one call); the
    // CUDA attention kernel is f16/bf16 only, so in f32 on CUDA none did. The group norms ran
    // fused on every device (the CUDA kernel has f32 too).
    let after = fused_calls_on_this_thread();
    let per_step = tiny().unet.attention_layers().len();
    let expected = if device().is_cpu() { 5 * per_step } else { 0 };
    assert_eq!(after.attention - calls.attention, expected);
    assert!(after.group_norm > calls.group_norm);
    assert_close(
        &g.latents,
        get(&r, "final_latents"),
        1e-3,
        "fused final latents",
    );
    assert_close(&g.image, get(&r, "image_01"), 1e-3, "fused image");
    // Against the unfused run in the same precision: only the summation order differs.
    let naive = with_kernels(Kernels::Naive, || {
        tiny().generate(prompt, &opts, &Job::quiet())
    })
    .unwrap();
    assert_close(&g.latents, &naive.latents, 1e-4, "fused vs unfused latents");
}

#[test]
fn half_precision_stays_close_to_the_f32_reference() {
    // The tolerances of tests/integration/dtype.rs: f16 2e-2, bf16 6e-2.
    let calls = fused_calls_on_this_thread();
    fused(|| crate::dtype::check_close_to_reference(DType::F16, 2e-2));
    let after = fused_calls_on_this_thread();
    assert!(
        after.attention > calls.attention && after.group_norm > calls.group_norm,
        "f16 runs fused on every device"
    );
    if !device().is_cpu() {
        fused(|| crate::dtype::check_close_to_reference(DType::BF16, 6e-2));
    }
}

#[test]
fn infusion_pair_matches_the_reference() {
    use crate::infusion::{check_one_concept_pair, concept, set};
    let concepts = set(vec![concept("mycat", "cat", "", 1.0)]);
    fused(|| check_one_concept_pair(&concepts));
}

#[test]
fn training_loss_and_gradients_match_the_reference() {
    // The F pass and C's layers upstream of every Δ run fused; C's layers that carry
    // gradients fall back to the differentiable path on their own.
    fused(crate::train::check_loss_and_gradients);
}

/// The op alone at SD1.5's head sizes (40, 80, 160) against matmul-softmax-matmul in f32 on the
/// same device; on CUDA at SD1.5's full 4096-pixel self-attention. Tolerances: f16 1e-2, bf16
/// 8e-2 (inputs, P and the output are rounded; values are ~N(0, 1)).
#[test]
fn the_op_matches_unfused_attention_at_sd15_head_sizes() {
    use candle_core::Tensor;
    let dev = device();
    let pixels = if dev.is_cpu() { 300 } else { 4096 };
    let mut dtypes = vec![(DType::F16, 1e-2)];
    if !dev.is_cpu() {
        dtypes.push((DType::BF16, 8e-2));
    }
    for (b, heads, n, m, d) in [
        (2, 8, pixels, pixels, 40),
        (2, 8, pixels, 77, 40),
        (2, 8, pixels / 4, 77, 80),
        (2, 8, pixels / 16, pixels / 16, 160),
    ] {
        let noise = |seed, dims: &[usize]| {
            infusion_repl::util::noise::seeded_noise(seed, dims)
                .unwrap()
                .to_device(&dev)
                .unwrap()
        };
        let q = (noise(1, &[b, heads, n, d]) * 2.0).unwrap();
        let k = (noise(2, &[b, heads, m, d]) * 2.0).unwrap();
        let v = noise(3, &[b, heads, m, d]);
        let scale = 1.0 / (d as f64).sqrt();
        for &(dtype, tol) in &dtypes {
            let [q, k, v] = [&q, &k, &v].map(|t| t.to_dtype(dtype).unwrap());
            let up = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            let scores = (up(&q).matmul(&up(&k).t().unwrap()).unwrap() * scale).unwrap();
            let want = candle_nn::ops::softmax_last_dim(&scores)
                .unwrap()
                .matmul(&up(&v))
                .unwrap();
            let got =
                infusion_repl::sd::fused::attention::fused_attention(&q, &k, &v, scale).unwrap();
            assert_eq!(got.dtype(), dtype);
            let err = max_abs(&(up(&got) - want).unwrap());
            assert!(
                err <= tol,
                "{dtype:?} {:?}: {err} > {tol}",
                (b, heads, n, m, d)
            );
        }
    }
}

/// Captured attention maps under `fused`: the captured (cross-attention) layers still compute
/// their probabilities, the others run fused, and every map matches the unfused run's within
/// 1e-4 (the maps test's tolerance against the reference), C's still equal to F's.
#[test]
fn captured_maps_are_those_of_the_unfused_run() {
    use crate::infusion::{concept, options, set};
    use infusion_repl::infusion::maps::AttentionMaps;
    use infusion_repl::Stream;
    let concepts = set(vec![concept("mycat", "cat", "", 1.0)]);
    let run = |kernels| {
        let maps = AttentionMaps::new(true);
        with_kernels(kernels, || {
            generate_pair(
                tiny(),
                &concepts,
                "a photo of a <mycat> sitting by a teapot",
                &options(1.0),
                Some(&maps),
                &Job::quiet(),
            )
        })
        .unwrap();
        maps
    };
    let before = fused_calls_on_this_thread();
    let fused_maps = run(Kernels::Fused);
    let after = fused_calls_on_this_thread();
    assert!(after.group_norm > before.group_norm);
    // The self-attention layers ran fused (f32 attention is unfused on CUDA).
    assert_eq!(after.attention > before.attention, device().is_cpu());
    let naive_maps = run(Kernels::Naive);
    assert_eq!(fused_maps.layers(), naive_maps.layers());
    for (layer, _) in naive_maps.layers() {
        for step in [0, 4] {
            let f = fused_maps
                .layer_map(Stream::Customized, &layer, Some(step))
                .unwrap();
            let n = naive_maps
                .layer_map(Stream::Customized, &layer, Some(step))
                .unwrap();
            assert_close(&f, &n, 1e-4, &format!("{layer} step {step}"));
            let ff = fused_maps
                .layer_map(Stream::Foundational, &layer, Some(step))
                .unwrap();
            assert_eq!(max_abs(&(&f - &ff).unwrap()), 0.0, "C uses F's maps");
        }
    }
}
