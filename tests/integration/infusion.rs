//! Infusion generation through the library (concepts, `<name>` prompts, the batched F/C run)
//! against reference/infusion.safetensors (tolerance 1e-3 relative for 5-step trajectories, as
//! tests/fixtures/README.md suggests), and its exact properties.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use infusion_repl::infusion::AttentionMaps;
use infusion_repl::{
    generate_pair, Concept, ConceptSet, Job, PairOptions, StableDiffusion, Stream,
};

use crate::common::{assert_close, get, max_abs, reference, tiny};

pub(crate) fn concept(name: &str, word: &str, prefix: &str, scale: f64) -> Concept {
    let r = reference("infusion.safetensors");
    let layers = tiny().unet.attention_layers();
    let mut c = Concept::zeros(name, word, layers.iter().copied(), None).unwrap();
    c.deltas = c
        .deltas
        .keys()
        .map(|k| {
            let d = (get(&r, &format!("{prefix}{k}"))
                .to_device(&Device::Cpu)
                .unwrap()
                * scale)
                .unwrap();
            (k.clone(), d)
        })
        .collect::<BTreeMap<_, _>>();
    c
}

pub(crate) fn set(concepts: Vec<Concept>) -> ConceptSet {
    let mut s = ConceptSet::new();
    for c in concepts {
        s.insert(c, false);
    }
    s
}

pub(crate) fn options(replace_steps: f64) -> PairOptions {
    let r = reference("infusion.safetensors");
    let mut o = PairOptions::default();
    o.generate.steps = 5;
    o.generate.guidance = 7.5;
    o.generate.noise = Some(get(&r, "init_noise").clone());
    o.replace_steps = replace_steps;
    o
}

fn diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a - b).unwrap())
}

/// Generates the fixture's one-concept prompt on `sd` (the tiny model, loaded with some
/// kernels) with `concepts` (which hold `mycat`) and checks F's and C's final latents against the
/// reference, and that C's image differs from F's.
pub(crate) fn check_one_concept_pair(sd: &StableDiffusion, concepts: &ConceptSet) {
    let r = reference("infusion.safetensors");
    let g = generate_pair(
        sd,
        concepts,
        "a photo of a <mycat> sitting by a teapot",
        &options(1.0),
        None,
        &Job::quiet(),
    )
    .unwrap();
    assert_eq!(g.parsed.base, "a photo of a cat sitting by a teapot");
    assert_eq!(g.concepts, vec!["mycat"]);
    assert_close(
        &g.base_latents,
        get(&r, "final_F_latents"),
        1e-3,
        "F latents",
    );
    assert_close(
        &g.custom_latents,
        get(&r, "final_C_latents"),
        1e-3,
        "C latents",
    );
    assert!(
        diff(&g.base_image, &g.custom_image) > 1e-3,
        "C's image differs from F's"
    );
}

#[test]
fn one_and_two_concepts_match_reference() {
    let r = reference("infusion.safetensors");
    let concepts = set(vec![
        concept("mycat", "cat", "", 1.0),
        concept("pot", "teapot", "concept2.", 1.0),
    ]);
    check_one_concept_pair(tiny(), &concepts);

    let g = generate_pair(
        tiny(),
        &concepts,
        "a photo of a <mycat> sitting by a <pot>",
        &options(1.0),
        None,
        &Job::quiet(),
    )
    .unwrap();
    assert_eq!(g.concepts, vec!["mycat", "pot"]);
    assert_close(
        &g.custom_latents,
        get(&r, "multi_final_C_latents"),
        1e-3,
        "multi C latents",
    );
}

#[test]
fn zero_delta_gives_c_equal_to_f_bit_for_bit() {
    let concepts = set(vec![concept("mycat", "cat", "", 0.0)]);
    for replace in [1.0, 0.0, 0.4] {
        let g = generate_pair(
            tiny(),
            &concepts,
            "a photo of a <mycat> sitting by a teapot",
            &options(replace),
            None,
            &Job::quiet(),
        )
        .unwrap();
        assert_eq!(
            diff(&g.base_latents, &g.custom_latents),
            0.0,
            "replace {replace}"
        );
        assert_eq!(
            diff(&g.base_image, &g.custom_image),
            0.0,
            "replace {replace}"
        );
    }
}

#[test]
fn a_prompt_without_concepts_gives_exactly_the_plain_sd_image() {
    let concepts = set(vec![concept("mycat", "cat", "", 1.0)]);
    let opts = options(1.0);
    let prompt = "a photo of a cat sitting by a teapot";
    let g = generate_pair(tiny(), &concepts, prompt, &opts, None, &Job::quiet()).unwrap();
    let plain = tiny()
        .generate(prompt, &opts.generate, &Job::quiet())
        .unwrap();
    assert_eq!(diff(&g.base_latents, &plain.latents), 0.0);
    assert_eq!(diff(&g.custom_image, &plain.image), 0.0);
    assert!(g.concepts.is_empty());
}

#[test]
fn replace_steps_trades_layout_for_freedom() {
    let concepts = set(vec![concept("mycat", "cat", "", 1.0)]);
    let prompt = "a photo of a <mycat> sitting by a teapot";
    let run = |f| {
        generate_pair(tiny(), &concepts, prompt, &options(f), None, &Job::quiet())
            .unwrap()
            .custom_latents
    };
    let all = run(1.0);
    let none = run(0.0);
    let some = run(0.6);
    assert!(diff(&all, &none) > 1e-4);
    assert!(diff(&all, &some) > 0.0 && diff(&none, &some) > 0.0);
    let e = generate_pair(
        tiny(),
        &concepts,
        prompt,
        &options(1.5),
        None,
        &Job::quiet(),
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("replace_steps"), "{e}");
}

#[test]
fn unknown_and_truncated_concepts_are_errors() {
    let concepts = set(vec![concept("mycat", "cat", "", 1.0)]);
    let e = generate_pair(
        tiny(),
        &concepts,
        "a <dog>",
        &options(1.0),
        None,
        &Job::quiet(),
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("<dog>"), "{e}");
    let long = format!("{} <mycat>", "a ".repeat(80));
    let e = generate_pair(tiny(), &concepts, &long, &options(1.0), None, &Job::quiet())
        .err()
        .unwrap();
    assert!(
        e.to_string().contains("<mycat>") && e.to_string().contains("cut off"),
        "{e}"
    );
}

/// The maps captured in a 5-step Infusion generation: F's head-mean map of every layer at step
/// 0 matches reference/attention.safetensors within 1e-4 relative; C's maps equal F's exactly
/// (replace_steps 1.0); the 8x8 aggregate's rows sum to one within 1e-5; a token overlay
/// changes the image; the saved file holds 2 streams x layers x 6 maps, the mid block's F map
/// of step 0 at (8, 8, 77).
#[test]
fn captured_maps_match_reference_and_c_uses_f_maps() {
    let concepts = set(vec![concept("mycat", "cat", "", 1.0)]);
    let maps = AttentionMaps::new(true);
    generate_pair(
        tiny(),
        &concepts,
        "a photo of a <mycat> sitting by a teapot",
        &options(1.0),
        Some(&maps),
        &Job::quiet(),
    )
    .unwrap();
    let r = reference("attention.safetensors");
    assert_eq!(maps.layers().len(), r.len());
    assert_eq!(maps.steps(), vec![0, 1, 2, 3, 4]);
    for (layer, expected) in &r {
        let (heads, n, keys) = expected.dims3().unwrap();
        let head_mean = (expected.sum(0).unwrap() / heads as f64).unwrap();
        let got = maps
            .layer_map(Stream::Foundational, layer, Some(0))
            .unwrap();
        let (h, w, k) = got.dims3().unwrap();
        assert_eq!((h * w, k), (n, keys));
        assert_close(&got.reshape((n, keys)).unwrap(), &head_mean, 1e-4, layer);
        let c = maps.layer_map(Stream::Customized, layer, Some(3)).unwrap();
        let f = maps
            .layer_map(Stream::Foundational, layer, Some(3))
            .unwrap();
        assert_eq!(diff(&c, &f), 0.0, "C uses F's maps");
    }
    // Aggregation over the 8x8 layers (the fixture's smallest), a token map, an overlay.
    assert_eq!(maps.resolutions(), vec![(16, 16), (8, 8)]);
    let agg = maps.aggregate(Stream::Customized, Some((8, 8))).unwrap();
    assert_eq!(agg.dims(), [8, 8, 77]);
    let sums = agg.sum(2).unwrap();
    assert_close(
        &sums,
        &sums.ones_like().unwrap(),
        1e-5,
        "aggregated rows sum to one",
    );
    let cat = infusion_repl::infusion::token_map(&agg, &[5]).unwrap();
    let img = image::RgbImage::from_pixel(32, 32, image::Rgb([128, 128, 128]));
    let over = infusion_repl::infusion::overlay(&img, &cat, 0.6).unwrap();
    assert_eq!((over.width(), over.height()), (32, 32));
    assert!(over.pixels().any(|p| p.0 != [128, 128, 128]));
    // Raw tensors out.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("maps.safetensors");
    maps.save(&path).unwrap();
    let back = infusion_repl::sd::load_safetensors(&path, &Device::Cpu).unwrap();
    let key = "F/mid_block.attentions.0.transformer_blocks.0.attn2/step0";
    assert_eq!(back[key].dims(), [8, 8, 77]);
    assert_eq!(back.len(), 2 * r.len() * 6);
}

#[test]
fn attention_overlays_for_concepts_and_words() {
    let concepts = set(vec![concept("mycat", "cat", "", 1.0)]);
    let maps = AttentionMaps::new(false);
    let g = generate_pair(
        tiny(),
        &concepts,
        "a photo of a <mycat> sitting by a teapot",
        &options(1.0),
        Some(&maps),
        &Job::quiet(),
    )
    .unwrap();
    assert_eq!(g.word_positions("<mycat>").unwrap(), vec![5]);
    assert_eq!(g.word_positions("teapot").unwrap(), vec![9]);
    assert!(g.word_positions("dog").is_err());
    let a = g
        .attention_overlay(&maps, Stream::Customized, "<mycat>", None)
        .unwrap();
    let b = g
        .attention_overlay(&maps, Stream::Customized, "teapot", None)
        .unwrap();
    assert_eq!(a.dimensions(), (32, 32));
    assert_ne!(a, b, "different tokens attend to different places");
    assert!(
        maps.steps().is_empty(),
        "per-step maps are only kept when asked for"
    );
}

/// A prompt longer than the text encoder takes is cut, and the one library path says so: the
/// command line and the scripts both go through it.
#[test]
fn a_cut_prompt_is_reported_through_the_job() {
    let long = vec!["teapot"; 100].join(" ");
    let mut o = options(1.0);
    o.generate.steps = 1;
    let job = Job::collecting();
    generate_pair(tiny(), &ConceptSet::new(), &long, &o, None, &job).unwrap();
    let m = job.messages();
    assert!(
        m.len() == 1 && m[0].starts_with("warning: ") && m[0].contains("cut off"),
        "{m:?}"
    );
    let job = Job::collecting();
    generate_pair(tiny(), &ConceptSet::new(), "a teapot", &o, None, &job).unwrap();
    assert!(job.messages().is_empty(), "{:?}", job.messages());
}
