//! Metric parity with reference/metrics.safetensors and reference/w2.safetensors (made by
//! transformers 5.17.0 / Pillow 13.0.0 / numpy, see tests/fixtures/README.md): Pillow's
//! resampling bit for bit, pixel values (<= 1e-6), embeddings (<= 1e-4 relative), cosine
//! matrices (<= 1e-5), W2 in float64 (<= 1e-6 relative).

use candle_core::{DType, Device, Tensor};
use infusion_repl::metrics::wasserstein;
use infusion_repl::metrics::Dino;
use infusion_repl::metrics::{cosine_matrix, Clip};

use crate::common::{assert_close, get, reference, repo};

const PROMPTS: [&str; 3] = [
    "a photo of a cat",
    "a teapot on a wooden table",
    "a highly detailed oil painting of an old lighthouse on a rocky cliff above a stormy sea at dusk, with seagulls circling the lantern room, waves crashing on the black rocks below, warm light spilling from the keeper's cottage windows, a winding path lined with wild flowers and tall grass, dramatic clouds, volumetric light, cinematic composition, trending on artstation, by a famous painter, masterpiece, best quality, ultra detailed, 8k resolution, golden hour glow",
];
const IMAGES: [&str; 3] = [
    "image0_61x97.png",
    "image1_321x245.png",
    "image2_224x224.png",
];

fn images() -> Vec<image::RgbImage> {
    IMAGES
        .iter()
        .map(|f| {
            image::open(repo().join("tests/fixtures/reference/images").join(f))
                .unwrap()
                .to_rgb8()
        })
        .collect()
}

fn u8_of(t: &Tensor) -> Vec<u8> {
    t.to_device(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<u8>()
        .unwrap()
}

fn clip() -> Clip {
    crate::common::tiny_scorers().0
}

fn dino() -> Dino {
    crate::common::tiny_scorers().1
}

#[test]
fn pillow_resampling_is_reproduced_bit_for_bit() {
    let r = reference("metrics.safetensors");
    let (c, d) = (clip(), dino());
    for (k, img) in images().iter().enumerate() {
        assert_eq!(
            img.as_raw().as_slice(),
            u8_of(get(&r, &format!("image{k}.rgb_u8"))).as_slice(),
            "PNG {k}"
        );
        let ours = c.processor.resize_crop(img);
        let theirs = u8_of(get(&r, &format!("clip.resized_cropped_u8.{k}")));
        let off = ours
            .as_raw()
            .iter()
            .zip(&theirs)
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(off, 0, "CLIP image {k}: {off} values differ");
        let ours = d.processor.resize_crop(img);
        let theirs = u8_of(get(&r, &format!("dino.resized_u8.{k}")));
        let off = ours
            .as_raw()
            .iter()
            .zip(&theirs)
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(off, 0, "DINO image {k}: {off} values differ");
    }
}

#[test]
fn pixel_values_match() {
    let r = reference("metrics.safetensors");
    let (c, d) = (clip(), dino());
    for (k, img) in images().iter().enumerate() {
        let ours = c
            .processor
            .pixel_values(img, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        assert_close(
            &ours,
            get(&r, &format!("clip.pixel_values.{k}")),
            1e-6,
            "CLIP pixel values",
        );
        let ours = d
            .processor
            .pixel_values(img, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        assert_close(
            &ours,
            get(&r, &format!("dino.pixel_values.{k}")),
            1e-6,
            "DINO pixel values",
        );
    }
}

/// The reference's pixel values of the three images, `(3, 3, 224, 224)`.
fn stored_pixels(r: &std::collections::HashMap<String, Tensor>, model: &str) -> Tensor {
    let each: Vec<Tensor> = (0..3)
        .map(|k| get(r, &format!("{model}.pixel_values.{k}")).clone())
        .collect();
    Tensor::cat(&each, 0).unwrap()
}

#[test]
fn clip_embeddings_and_scores_match() {
    let r = reference("metrics.safetensors");
    let c = clip();
    let px = stored_pixels(&r, "clip");
    let (last, pooled, img) = c.vision_forward(&px).unwrap();
    assert_close(
        &last,
        get(&r, "clip.vision_last_hidden_state"),
        1e-4,
        "vision last hidden state",
    );
    assert_close(&pooled, get(&r, "clip.image_pooled"), 1e-4, "image pooled");
    assert_close(&img, get(&r, "clip.image_embeds"), 1e-4, "image embeds");
    // From the PNGs through our preprocessing: the same embeddings.
    assert_close(
        &c.image_embeds(&images()).unwrap(),
        get(&r, "clip.image_embeds"),
        1e-4,
        "image embeds from PNGs",
    );

    let ids = c.token_ids(&PROMPTS).unwrap();
    let ref_ids = get(&r, "clip.text_ids").to_dtype(DType::U32).unwrap();
    assert_eq!(
        ids.to_vec2::<u32>().unwrap(),
        ref_ids.to_vec2::<u32>().unwrap()
    );
    let (last, pooled, txt) = c.text_forward(&ids).unwrap();
    assert_close(
        &last,
        get(&r, "clip.text_last_hidden_state"),
        1e-4,
        "text last hidden state",
    );
    assert_close(&pooled, get(&r, "clip.text_pooled"), 1e-4, "text pooled");
    assert_close(&txt, get(&r, "clip.text_embeds"), 1e-4, "text embeds");
    assert_close(
        &c.text_embeds(&PROMPTS).unwrap(),
        get(&r, "clip.text_embeds"),
        1e-4,
        "text embeds from prompts",
    );

    let clip_t = cosine_matrix(&img, &txt).unwrap();
    assert_close(&clip_t, get(&r, "clip_t"), 1e-5, "CLIP-T");
    assert_close(
        &cosine_matrix(&img, &img).unwrap(),
        get(&r, "clip_i"),
        1e-5,
        "CLIP-I",
    );
    let logits =
        (clip_t * c.logit_scale.exp().unwrap().to_scalar::<f32>().unwrap() as f64).unwrap();
    assert_close(
        &logits,
        get(&r, "clip.logits_per_image"),
        1e-4,
        "logits per image",
    );
}

#[test]
fn dino_embeddings_and_scores_match() {
    let r = reference("metrics.safetensors");
    let d = dino();
    let px = stored_pixels(&r, "dino");
    let last = d.forward(&px).unwrap();
    assert_close(
        &last,
        get(&r, "dino.last_hidden_state"),
        1e-4,
        "DINO last hidden state",
    );
    let cls = d.embeds(&images()).unwrap();
    assert_close(&cls, get(&r, "dino.cls"), 1e-4, "DINO CLS from PNGs");
    assert_close(
        &cosine_matrix(&cls, &cls).unwrap(),
        get(&r, "dino_i"),
        1e-5,
        "DINO-I",
    );
}

#[test]
fn w2_matches_reference_in_both_regimes() {
    let r = reference("w2.safetensors");
    for case in ["low", "high"] {
        let a = get(&r, &format!("{case}.A"));
        let b = get(&r, &format!("{case}.B"));
        let w = wasserstein(a, b, None).unwrap();
        let f64_of = |k: &str| {
            get(&r, &format!("{case}.{k}"))
                .to_dtype(DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        for (name, ours, theirs) in [
            ("w2", w.w2, f64_of("w2")),
            ("w2_squared", w.w2_squared, f64_of("w2_squared")),
            ("mean_term", w.mean_term, f64_of("mean_term")),
            (
                "trace_sqrt_term",
                w.trace_sqrt_term,
                f64_of("trace_sqrt_term"),
            ),
        ] {
            let rel = ((ours - theirs) / theirs).abs();
            assert!(
                rel <= 1e-6,
                "{case} {name}: {ours} vs {theirs} (rel {rel:e})"
            );
        }
    }
}

/// W2 of a set against itself is below 1e-6; W2² is symmetric within 1e-9 relative; pooling
/// (n, 4, 8, 8) latents to a 2x2 grid gives 16 dimensions and a positive distance; sets of
/// different dimensions are refused.
#[test]
fn w2_is_zero_for_identical_sets_and_symmetric() {
    let r = reference("w2.safetensors");
    let a = get(&r, "low.A");
    let b = get(&r, "low.B");
    let same = wasserstein(a, a, None).unwrap();
    assert!(same.w2 < 1e-6, "{}", same.w2);
    let ab = wasserstein(a, b, None).unwrap();
    let ba = wasserstein(b, a, None).unwrap();
    assert!((ab.w2_squared - ba.w2_squared).abs() <= 1e-9 * ab.w2_squared);
    // Pooling [n, C, H, W] latents to a smaller grid: fewer dims, still a distance.
    let la = infusion_repl::util::seeded_noise(1, &[6, 4, 8, 8]).unwrap();
    let lb = (infusion_repl::util::seeded_noise(2, &[5, 4, 8, 8]).unwrap() + 0.5).unwrap();
    let pooled = wasserstein(&la, &lb, Some(4)).unwrap();
    assert_eq!(pooled.dims, 4 * 2 * 2);
    assert!(pooled.w2 > 0.0);
    assert!(wasserstein(
        &la,
        &Tensor::zeros((1, 4, 8, 8), DType::F32, &Device::Cpu).unwrap(),
        None
    )
    .is_err());
    // A NaN or an infinity is refused by name (nalgebra's SVD never returned on one: issue 21,
    // item 16).
    for bad in [f32::NAN, f32::INFINITY] {
        let mut v = vec![0.5f32; 3 * 4];
        v[7] = bad;
        let t = Tensor::from_vec(v, (3, 4), &Device::Cpu).unwrap();
        let e = wasserstein(a, &t, None).unwrap_err().to_string();
        assert!(e.contains("latents_b") && e.contains("sample 1"), "{e}");
    }
}
