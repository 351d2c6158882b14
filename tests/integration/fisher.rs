//! Latent Fisher divergence: exactly 0 where the variants agree, > 0 and equal to a direct
//! computation where they do not, a standard error that shrinks with samples.

use candle_core::Device;
use infusion_repl::metrics::{
    fisher_divergence, fisher_inputs, unet_from_file, FisherOptions, Variant,
};
use infusion_repl::{Concept, ConceptSet, Job};

use crate::common::{tiny, tiny_model_dir};

fn opts(samples: usize) -> FisherOptions {
    FisherOptions {
        samples,
        seed: 5,
        batch: 3,
        gen_steps: 3,
        ..Default::default()
    }
}

fn prompts(p: &[&str]) -> Vec<String> {
    p.iter().map(|s| s.to_string()).collect()
}

fn concepts() -> ConceptSet {
    let sd = tiny();
    let mut c = Concept::zeros("mycat", "cat", sd.unet.attention_layers(), None).unwrap();
    for (i, d) in c.deltas.values_mut().enumerate() {
        *d = infusion_repl::util::seeded_noise(i as u64, d.dims()).unwrap();
    }
    let mut set = ConceptSet::new();
    set.insert(c, false);
    set
}

#[test]
fn zero_for_the_base_against_itself_and_against_concepts_on_plain_prompts() {
    let sd = tiny();
    let p = prompts(&["a photo of a dog", "a lighthouse at dusk", "a cat on a mat"]);
    let f = fisher_divergence(
        sd,
        &Variant::Base,
        &Variant::Base,
        &p,
        &opts(6),
        &Job::quiet(),
    )
    .unwrap();
    assert_eq!((f.mean, f.samples), (0.0, 6));
    let set = concepts();
    let f = fisher_divergence(
        sd,
        &Variant::Base,
        &Variant::Concepts(&set),
        &p,
        &opts(6),
        &Job::quiet(),
    )
    .unwrap();
    assert_eq!(
        f.mean, 0.0,
        "no prompt names a concept: Infusion leaves the base model as it is"
    );
    let marked = prompts(&["a photo of a <mycat>", "a lighthouse at dusk"]);
    let f = fisher_divergence(
        sd,
        &Variant::Base,
        &Variant::Concepts(&set),
        &marked,
        &opts(4),
        &Job::quiet(),
    )
    .unwrap();
    assert!(f.mean > 0.0);
    // Samples 1 and 3 use the plain prompt: exactly 0 there.
    assert_eq!((f.values[1], f.values[3]), (0.0, 0.0));
    assert!(f.values[0] > 0.0 && f.values[2] > 0.0);
}

#[test]
fn other_weights_give_the_directly_computed_value() {
    let sd = tiny();
    let dir = tempfile::tempdir().unwrap();
    let file = tiny_model_dir().join("unet/diffusion_pytorch_model.safetensors");
    let mut t = infusion_repl::sd::load_safetensors(&file, &Device::Cpu).unwrap();
    let k = "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_out.0.bias";
    let changed = (&t[k] + 0.05).unwrap();
    t.insert(k.to_string(), changed);
    let path = dir.path().join("tuned.safetensors");
    candle_core::safetensors::save(&t, &path).unwrap();
    let other = unet_from_file(sd, &path).unwrap();

    let p = prompts(&["a photo of a cat", "a teapot"]);
    let o = opts(5);
    let f = fisher_divergence(
        sd,
        &Variant::Base,
        &Variant::Weights(&other),
        &p,
        &o,
        &Job::quiet(),
    )
    .unwrap();
    assert!(f.mean > 0.0);

    // Directly: the same samples, one at a time.
    let samples = fisher_inputs(sd, None, &p, &o, &Job::quiet()).unwrap();
    let mut total = 0.0;
    for s in &samples {
        let tok = sd.tokenize(&s.prompt).unwrap();
        let ctx = sd.text_states(&[&tok]).unwrap();
        let t = candle_core::Tensor::new(s.timestep as f32, sd.device()).unwrap();
        let a = sd.unet.forward(&s.z_t, &t, &ctx, None).unwrap();
        let b = other.forward(&s.z_t, &t, &ctx, None).unwrap();
        let v = (a - b)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        total += v as f64;
    }
    // Definition 3.1: half the mean squared distance.
    let direct = 0.5 * total / samples.len() as f64;
    let rel = ((f.mean - direct) / direct).abs();
    assert!(
        rel < 1e-5,
        "batched {} vs direct {direct} (rel {rel:e})",
        f.mean
    );
}

/// Fisher divergence from the base to a concept set: the same sample count gives bit-identical
/// values; 32 samples give a smaller standard error than 4; with training images (their
/// latents as the clean samples) the mean is positive and differs from the text-only mean.
#[test]
fn deterministic_and_the_standard_error_shrinks_with_samples() {
    let sd = tiny();
    let set = concepts();
    let p = prompts(&["a photo of a <mycat>", "a <mycat> on a sofa"]);
    let run = |n| {
        fisher_divergence(
            sd,
            &Variant::Base,
            &Variant::Concepts(&set),
            &p,
            &opts(n),
            &Job::quiet(),
        )
        .unwrap()
    };
    let small = run(4);
    assert_eq!(run(4).values, small.values);
    let large = run(32);
    assert!(
        large.std_err < small.std_err,
        "{} vs {}",
        large.std_err,
        small.std_err
    );
    // With images: their latents are the clean samples.
    let imgs: Vec<image::RgbImage> = (0..2u8)
        .map(|i| {
            image::RgbImage::from_fn(40, 40, |x, y| {
                image::Rgb([x as u8 * 6, y as u8 * 6, i * 100])
            })
        })
        .collect();
    let o = FisherOptions {
        images: imgs,
        ..opts(4)
    };
    let f = fisher_divergence(
        sd,
        &Variant::Base,
        &Variant::Concepts(&set),
        &p,
        &o,
        &Job::quiet(),
    )
    .unwrap();
    assert!(f.mean > 0.0 && f.mean != small.mean);
}
