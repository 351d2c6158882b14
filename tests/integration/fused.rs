//! The fused kernels (`--kernels fused`: attention, group norm + SiLU) through the whole
//! pipeline: text-to-image, half precision, Infusion (C reusing F's cross-attention
//! probabilities) and the training loss with its gradients, each against the same references and
//! tolerances as the unfused path. On the CPU this runs the Rust implementations of the kernels'
//! algorithms; with `INFUSION_TEST_DEVICE=cuda`, the CUDA kernels (attention in f16 and bf16
//! only: f32 attention stays unfused there).
//! Each test loads the tiny model with `kernels: Fused` ([`tiny_with`]); the naive model the
//! other tests use is another model, which keeps its own choice (checked below).

use candle_core::DType;
use infusion_repl::sd::{fused_calls_on_this_thread, FusedCalls, Kernels};
use infusion_repl::{generate_pair, GenerateOptions, Job};

use crate::common::{assert_close, device, get, max_abs, reference, tiny, tiny_with};

fn fused_tiny() -> &'static infusion_repl::StableDiffusion {
    tiny_with(Kernels::Fused)
}

#[test]
fn txt2img_matches_the_reference_and_the_unfused_run() {
    let r = reference("txt2img.safetensors");
    let prompt = "a photo of a cat sitting by a teapot";
    let opts = crate::txt2img::options(&r);
    let calls = fused_calls_on_this_thread();
    let g = fused_tiny().generate(prompt, &opts, &Job::quiet()).unwrap();
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
    let naive = tiny().generate(prompt, &opts, &Job::quiet()).unwrap();
    assert_close(&g.latents, &naive.latents, 1e-4, "fused vs unfused latents");
}

#[test]
fn half_precision_stays_close_to_the_f32_reference() {
    // The tolerances of tests/integration/dtype.rs: f16 2e-2, bf16 6e-2.
    let calls = fused_calls_on_this_thread();
    crate::dtype::check_close_to_reference(DType::F16, Kernels::Fused, 2e-2);
    let after = fused_calls_on_this_thread();
    assert!(
        after.attention > calls.attention && after.group_norm > calls.group_norm,
        "f16 runs fused on every device"
    );
    if !device().is_cpu() {
        crate::dtype::check_close_to_reference(DType::BF16, Kernels::Fused, 6e-2);
    }
}

#[test]
fn infusion_pair_matches_the_reference() {
    use crate::infusion::{check_one_concept_pair, concept, set};
    let concepts = set(vec![concept("mycat", "cat", "", 1.0)]);
    let calls = fused_calls_on_this_thread();
    check_one_concept_pair(fused_tiny(), &concepts);
    assert!(fused_calls_on_this_thread().group_norm > calls.group_norm);
}

#[test]
fn training_loss_and_gradients_match_the_reference() {
    // The F pass and C's layers upstream of every Δ run fused; C's layers that carry
    // gradients fall back to the differentiable path on their own.
    let calls = fused_calls_on_this_thread();
    crate::train::check_loss_and_gradients(fused_tiny());
    assert!(fused_calls_on_this_thread().group_norm > calls.group_norm);
}

/// Two models of the same files in one process, one loaded naive and one fused, each keep
/// their own choice however their generations interleave: only the fused model's runs move
/// the fused-call counter, and each model gives the same latents every time. The UNets a model
/// builds later (a trainable copy) run its kernels too.
#[test]
fn two_models_keep_their_own_kernels() {
    let (naive, fused) = (tiny(), fused_tiny());
    assert_eq!(
        (naive.kernels(), fused.kernels()),
        (Kernels::Naive, Kernels::Fused)
    );
    for (sd, k) in [(naive, Kernels::Naive), (fused, Kernels::Fused)] {
        let (trainable, _) = sd.trainable_unet().unwrap();
        for unet in [&sd.unet, &trainable] {
            for l in unet.attention_layers() {
                assert_eq!(unet.attention(&l.path).unwrap().kernels(), k, "{}", l.path);
            }
        }
    }
    let opts = GenerateOptions {
        steps: 2,
        ..Default::default()
    };
    let run = |sd: &infusion_repl::StableDiffusion| -> (candle_core::Tensor, FusedCalls) {
        let before = fused_calls_on_this_thread();
        let g = sd.generate("a teapot", &opts, &Job::quiet()).unwrap();
        let after = fused_calls_on_this_thread();
        (
            g.latents,
            FusedCalls {
                attention: after.attention - before.attention,
                group_norm: after.group_norm - before.group_norm,
            },
        )
    };
    let (n1, n1_calls) = run(naive);
    let (f1, f1_calls) = run(fused);
    let (n2, n2_calls) = run(naive);
    let (f2, f2_calls) = run(fused);
    assert_eq!(
        n1_calls,
        FusedCalls::default(),
        "the naive model runs no fused op"
    );
    assert_eq!(
        n2_calls,
        FusedCalls::default(),
        "nor after the fused one ran"
    );
    assert!(
        f1_calls.group_norm > 0,
        "the fused model runs fused group norms"
    );
    // f32 attention is fused on the CPU only.
    assert_eq!(f1_calls.attention > 0, device().is_cpu());
    assert_eq!(
        f1_calls, f2_calls,
        "the fused model runs the same ops each time"
    );
    assert_eq!(
        max_abs(&(&n1 - &n2).unwrap()),
        0.0,
        "naive runs repeat exactly"
    );
    assert_eq!(
        max_abs(&(&f1 - &f2).unwrap()),
        0.0,
        "fused runs repeat exactly"
    );
    assert_close(&f1, &n1, 1e-4, "fused vs naive latents");
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
            infusion_repl::util::seeded_noise(seed, dims)
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
            let got = infusion_repl::sd::fused_attention(&q, &k, &v, scale).unwrap();
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
    use infusion_repl::infusion::AttentionMaps;
    use infusion_repl::Stream;
    let concepts = set(vec![concept("mycat", "cat", "", 1.0)]);
    let run = |kernels| {
        let maps = AttentionMaps::new(true);
        generate_pair(
            tiny_with(kernels),
            &concepts,
            "a photo of a <mycat> sitting by a teapot",
            &options(1.0),
            Some(&maps),
            &Job::quiet(),
        )
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
