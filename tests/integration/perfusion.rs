//! Perfusion against a direct PyTorch implementation of the paper's equations on the tiny model
//! (tests/fixtures/baselines/perfusion, made by tools/make_perfusion_fixtures.py with torch
//! 2.11.0 / diffusers 0.42.1 / transformers 5.17 on the CPU): the covariance C, one layer's gated
//! edit for one and for two concepts (the C^-1-orthogonalised projection), one training step's
//! loss and gradients; then the flows users run (train, save, load, generate, two concepts in one
//! prompt, resume).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use infusion_repl::methods::{covariance_of, Gate, RankOneHook, Target, BUILTIN_CAPTIONS};
use infusion_repl::methods::{text_states, Embedding};
use infusion_repl::{Branch, Job, Projection};
use nalgebra::DMatrix;

use crate::common::{assert_close, get, max_abs, repo, tiny};

const LAYER: &str = "down_blocks.0.attentions.0.transformer_blocks.0.attn2";

fn load(name: &str) -> HashMap<String, Tensor> {
    infusion_repl::sd::load_safetensors(
        &repo().join("tests/fixtures/baselines/perfusion").join(name),
        &Device::Cpu,
    )
    .unwrap()
}

fn matrix(t: &Tensor) -> DMatrix<f64> {
    let v = t.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap();
    DMatrix::from_fn(v.len(), v[0].len(), |i, j| v[i][j])
}

/// The reference's C^-1.
fn reference_inverse() -> DMatrix<f64> {
    matrix(get(&load("covariance.safetensors"), "cov.matrix"))
        .try_inverse()
        .unwrap()
}

fn projection(layer: &str, p: Projection) -> Tensor {
    tiny()
        .unet
        .attention(layer)
        .unwrap()
        .projection(p)
        .0
        .clone()
}

/// C over the first 64 shipped captions' non-padding tokens: 1e-4 of its largest entry.
#[test]
fn the_covariance_matches_the_reference() {
    let want = get(&load("covariance.safetensors"), "cov.matrix").clone();
    let captions: Vec<String> = BUILTIN_CAPTIONS
        .lines()
        .filter(|l| !l.trim().is_empty())
        .take(64)
        .map(str::to_string)
        .collect();
    let c = covariance_of(tiny(), &captions, &Job::quiet()).unwrap();
    let scale = matrix(&want).abs().max();
    let off = (c - matrix(&want)).abs().max();
    assert!(off <= 1e-4 * scale, "C is {off} off (scale {scale})");
}

/// One layer's gated edit of K and V for one concept, and for two (orthogonalised together),
/// with the reference's C: 1e-4 of the outputs' scale.
#[test]
fn the_gated_edit_matches_the_papers_formula_for_one_and_two_concepts() {
    let s = load("edit.safetensors");
    let sd = tiny();
    let inv = reference_inverse();
    let input = get(&s, "edit.input");
    let gate = Gate {
        beta: 0.7,
        tau: 0.15,
    };
    let one = BTreeMap::from([(LAYER.to_string(), get(&s, "edit.value_output").clone())]);
    let two = BTreeMap::from([(LAYER.to_string(), get(&s, "multi.value_output2").clone())]);
    let first = Target {
        input: get(&s, "edit.target"),
        superclass: get(&s, "edit.superclass"),
        values: &one,
    };
    let second = Target {
        input: get(&s, "multi.target2"),
        superclass: get(&s, "multi.superclass2"),
        values: &two,
    };
    for (targets, prefix) in [
        (vec![first], "edit"),
        (vec![first_again(&s, &one), second], "multi"),
    ] {
        let hook = RankOneHook::new(sd, &inv, &targets, gate, None, None).unwrap();
        for (p, name) in [(Projection::Key, "key"), (Projection::Value, "value")] {
            let plain = input
                .broadcast_matmul(&projection(LAYER, p).t().unwrap())
                .unwrap();
            let got = hook.edit(LAYER, p, input, &plain).unwrap().unwrap();
            let want = get(&s, &format!("{prefix}.{name}"));
            let scale = max_abs(want);
            assert_close(
                &got,
                want,
                1e-4 * scale.max(1.0),
                &format!("{prefix}.{name}"),
            );
        }
    }
}

fn first_again<'a>(
    s: &'a HashMap<String, Tensor>,
    one: &'a BTreeMap<String, Tensor>,
) -> Target<'a> {
    Target {
        input: get(s, "edit.target"),
        superclass: get(s, "edit.superclass"),
        values: one,
    }
}

/// One training step (the training gate, the first batch's target and superclass encodings,
/// o*_V from W_V of the superclass): the loss (1e-4 relative) and the gradients of the word's
/// embedding and of every layer's value output (2e-4 of their scale: f32 rounding through the
/// whole UNet and back; since the CPU's norm, GEGLU and attention ops have their own backward
/// passes, the worst layer is at 1.3e-4, where candle's composites gave under 1e-4).
#[test]
fn a_perfusion_training_step_matches_the_reference() {
    let s = load("step.safetensors");
    let sd = tiny();
    let inv = reference_inverse();
    let tokens = sd.tokenize("a photo of a teapot").unwrap();
    assert_eq!(tokens.tokens[5], "teapot</w>");
    let embedding = Var::from_tensor(get(&s, "step.embedding")).unwrap();
    let e = Embedding {
        token: "<pot>".into(),
        vectors: embedding.as_tensor().clone(),
    };
    let states = text_states(sd, &tokens, 5..6, &e).unwrap();
    let plain = sd.text_states(&[&tokens]).unwrap();
    // The learner's first-batch encodings are the reference's.
    let superclass = plain.get(0).unwrap().get(5).unwrap();
    assert_close(&superclass, get(&s, "step.superclass"), 1e-5, "superclass");
    let target = states.get(0).unwrap().get(5).unwrap().detach();
    assert_close(&target, get(&s, "step.target"), 1e-5, "target");
    let layers: Vec<String> = sd
        .unet
        .attention_layers()
        .into_iter()
        .filter(|l| l.kind == infusion_repl::AttnKind::CrossAttention)
        .map(|l| l.path.clone())
        .collect();
    let vars: BTreeMap<String, Var> = layers
        .iter()
        .map(|l| {
            let w = projection(l, Projection::Value);
            let o = w
                .matmul(&superclass.unsqueeze(1).unwrap())
                .unwrap()
                .squeeze(1)
                .unwrap();
            (l.clone(), Var::from_tensor(&o).unwrap())
        })
        .collect();
    let values: BTreeMap<String, Tensor> = vars
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    let hook = RankOneHook::new(
        sd,
        &inv,
        &[Target {
            input: &target,
            superclass: &superclass,
            values: &values,
        }],
        Gate {
            beta: 0.75,
            tau: 0.1,
        },
        None,
        None,
    )
    .unwrap();
    let (latents, noise) = (get(&s, "batch.latents"), get(&s, "batch.noise"));
    let ts = [100usize, 700];
    let z = sd.scheduler.add_noise(latents, noise, &ts).unwrap();
    let t = Tensor::new(&[100f32, 700.0], &Device::Cpu).unwrap();
    let ctx = Tensor::cat(&[&states, &states], 0).unwrap();
    let rows =
        infusion_repl::BatchLayout::uniform(2, Branch(1), infusion_repl::Guidance::Conditional);
    let hook_ctx = infusion_repl::HookCtx {
        hook: &hook,
        rows: &rows,
        step: None,
    };
    let pred = sd.unet.forward(&z, &t, &ctx, Some(&hook_ctx)).unwrap();
    let loss = (pred - noise).unwrap().sqr().unwrap().mean_all().unwrap();
    let value = loss.to_scalar::<f32>().unwrap() as f64;
    let want = get(&s, "step.loss").to_vec1::<f32>().unwrap()[0] as f64;
    assert!(
        (value - want).abs() <= 1e-4 * want,
        "loss {value} vs {want}"
    );
    let grads = loss.backward().unwrap();
    let g = grads.get(embedding.as_tensor()).unwrap();
    let want = get(&s, "step.grad.embedding");
    assert_close(g, want, 2e-4 * max_abs(want), "embedding");
    for (layer, v) in &vars {
        let g = grads.get(v.as_tensor()).unwrap();
        let want = get(&s, &format!("step.grad.{layer}.value_output"));
        assert_close(g, want, 2e-4 * max_abs(want), layer);
    }
}

fn ask(dir: &Path, out: &Path, resume: Option<PathBuf>) -> infusion_repl::actions::TrainAsk {
    infusion_repl::actions::TrainAsk {
        folder: repo().join("assets/example-concept"),
        name: "pot".into(),
        word: "teapot".into(),
        method: Some("perfusion".into()),
        steps: Some(4),
        checkpoint_every: Some(2),
        checkpoint_dir: Some(dir.join("ck")),
        resume,
        out: Some(out.to_path_buf()),
        settings: BTreeMap::from([("accumulate".to_string(), serde_json::json!(2))]),
        ..Default::default()
    }
}

/// Trained in a session (2 batches a step), saved as a `perfusion-concept/1` file (small: no C
/// in it), loaded back with the path alone: the same C latents, C unlike F; resumed from a
/// checkpoint, the same run (the running target kept in the file); two concepts in one prompt
/// generate, and differ from either alone.
#[test]
fn perfusion_trains_saves_loads_resumes_and_composes() {
    use infusion_repl::actions::{load_concept, train_concept};
    use infusion_repl::methods::ConceptRequest;
    use infusion_repl::{generate_pair, ConceptSet, PairOptions};
    let sd = tiny();
    let job = Job::quiet();
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("pot.safetensors");
    let full = train_concept(sd, &ask(dir.path(), &a, None).resolve().unwrap(), &job).unwrap();
    assert_eq!(full.losses.len(), 4);
    assert!(full.losses.iter().all(|l| l.is_finite()));
    let bytes = std::fs::metadata(&a).unwrap().len();
    // The tiny model's 6 layers x 32 values, 3 vectors of 32, and the header: under 4 KB.
    assert!(bytes < 4096, "{bytes} bytes");
    let b = dir.path().join("resumed.safetensors");
    let resumed = train_concept(
        sd,
        &ask(dir.path(), &b, Some(full.checkpoints[0].clone()))
            .resolve()
            .unwrap(),
        &job,
    )
    .unwrap();
    assert_eq!(resumed.losses, full.losses[2..]);
    let (ta, tb) = (
        infusion_repl::sd::load_safetensors(&a, &Device::Cpu).unwrap(),
        infusion_repl::sd::load_safetensors(&b, &Device::Cpu).unwrap(),
    );
    assert_eq!(ta.len(), tb.len());
    for (k, t) in &ta {
        assert_eq!(max_abs(&(t - &tb[k]).unwrap()), 0.0, "{k}");
    }
    let opts = PairOptions {
        generate: infusion_repl::GenerateOptions {
            steps: 2,
            seed: 3,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut trained = ConceptSet::new();
    trained.add(full.concept.clone(), false, &job);
    let mut loaded = ConceptSet::new();
    let c = load_concept(
        &ConceptRequest {
            path: a.clone(),
            ..Default::default()
        },
        Some(sd),
        &mut loaded,
        &job,
    )
    .unwrap();
    assert_eq!(
        (c.name(), c.word(), c.method()),
        ("pot", "teapot", "perfusion")
    );
    assert!(
        c.summary().contains("beta 0.7, tau 0.15"),
        "{}",
        c.summary()
    );
    // The gate at generation, in place of the file's; refused for a file without one.
    let mut other = ConceptSet::new();
    let softer = load_concept(
        &ConceptRequest {
            path: a.clone(),
            beta: Some(0.5),
            tau: Some(0.3),
            ..Default::default()
        },
        Some(sd),
        &mut other,
        &job,
    )
    .unwrap();
    assert!(
        softer.summary().contains("beta 0.5, tau 0.3"),
        "{}",
        softer.summary()
    );
    let e = load_concept(
        &ConceptRequest {
            path: repo().join("tests/fixtures/baselines/learned_embeds.safetensors"),
            word: Some("cat".into()),
            beta: Some(0.5),
            ..Default::default()
        },
        Some(sd),
        &mut other,
        &job,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("no beta"), "{e}");
    let prompt = "a <pot> on a table";
    let x = generate_pair(sd, &trained, prompt, &opts, None, &job).unwrap();
    let y = generate_pair(sd, &loaded, prompt, &opts, None, &job).unwrap();
    assert_eq!(
        max_abs(&(&x.custom_latents - &y.custom_latents).unwrap()),
        0.0
    );
    assert!(
        max_abs(&(&x.custom_latents - &x.base_latents).unwrap()) > 1e-4,
        "C must differ from F"
    );
    // The covariance was cached beside the file, for the next load.
    let cached: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("perfusion-covariance-")
        })
        .collect();
    assert_eq!(cached.len(), 1);
    // A second concept, trained on its own word, beside the first.
    let cup = dir.path().join("cup.safetensors");
    let mut second = ask(dir.path(), &cup, None);
    (second.name, second.word, second.steps) = ("cup".into(), "cup".into(), Some(1));
    second.checkpoint_every = None;
    let cup_run = train_concept(sd, &second.resolve().unwrap(), &job).unwrap();
    loaded.add(cup_run.concept.clone(), false, &job);
    let both = generate_pair(sd, &loaded, "a <pot> beside a <cup>", &opts, None, &job).unwrap();
    let alone = generate_pair(sd, &loaded, "a <pot> beside a cup", &opts, None, &job).unwrap();
    assert!(both
        .custom_latents
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .all(|v| v.is_finite()));
    assert!(
        max_abs(&(&both.custom_latents - &alone.custom_latents).unwrap()) > 1e-5,
        "the second concept must change C"
    );
    assert_eq!(
        max_abs(&(&both.base_latents - &alone.base_latents).unwrap()),
        0.0,
        "F sees the class words either way"
    );
}

/// Both new methods' concepts (Custom Diffusion from the script's files, Perfusion trained a
/// step) work with the attention maps (C's maps differ from F's: both change the keys) and the
/// Fisher divergence (positive on prompts that name them, zero on prompts that do not).
#[test]
fn custom_diffusion_and_perfusion_concepts_give_maps_and_fisher_divergence() {
    use infusion_repl::actions::{load_concept, train_concept};
    use infusion_repl::infusion::AttentionMaps;
    use infusion_repl::methods::ConceptRequest;
    use infusion_repl::metrics::{fisher_divergence, FisherOptions, Variant};
    use infusion_repl::Stream;
    use infusion_repl::{generate_pair, ConceptSet, PairOptions};
    let sd = tiny();
    let job = Job::quiet();
    let dir = tempfile::tempdir().unwrap();
    let cd = dir.path().join("pot-cd");
    std::fs::create_dir(&cd).unwrap();
    for f in [
        "pytorch_custom_diffusion_weights.safetensors",
        "<new1>.safetensors",
    ] {
        std::fs::copy(
            repo()
                .join("tests/fixtures/baselines/custom_diffusion")
                .join(f),
            cd.join(f),
        )
        .unwrap();
    }
    let mut cd_set = ConceptSet::new();
    load_concept(
        &ConceptRequest {
            path: cd,
            name: Some("pot".into()),
            word: Some("teapot".into()),
            ..Default::default()
        },
        Some(sd),
        &mut cd_set,
        &job,
    )
    .unwrap();
    let mut pf = ask(dir.path(), &dir.path().join("pf.safetensors"), None);
    (pf.steps, pf.checkpoint_every) = (Some(1), None);
    let run = train_concept(sd, &pf.resolve().unwrap(), &job).unwrap();
    let mut pf_set = ConceptSet::new();
    pf_set.add(run.concept.clone(), false, &job);
    let opts = PairOptions {
        generate: infusion_repl::GenerateOptions {
            steps: 2,
            seed: 5,
            ..Default::default()
        },
        ..Default::default()
    };
    let fisher_opts = FisherOptions {
        samples: 2,
        gen_steps: 2,
        ..Default::default()
    };
    let marked = vec!["a photo of a <pot>".to_string()];
    let plain = vec!["a lighthouse at dusk".to_string()];
    for (method, set) in [("custom_diffusion", &cd_set), ("perfusion", &pf_set)] {
        let maps = AttentionMaps::new(false);
        generate_pair(sd, set, "a <pot> on a table", &opts, Some(&maps), &job).unwrap();
        let layer = "mid_block.attentions.0.transformer_blocks.0.attn2";
        let f = maps.layer_map(Stream::Foundational, layer, None).unwrap();
        let c = maps.layer_map(Stream::Customized, layer, None).unwrap();
        assert!(
            max_abs(&(&c - &f).unwrap()) > 1e-6,
            "{method}: C's maps are F's"
        );
        let fisher = |p: &[String]| {
            fisher_divergence(
                sd,
                &Variant::Base,
                &Variant::Concepts(set),
                p,
                &fisher_opts,
                &job,
            )
            .unwrap()
            .mean
        };
        assert!(
            fisher(&marked) > 1e-6,
            "{method}: no divergence where named"
        );
        assert_eq!(fisher(&plain), 0.0, "{method}: a prompt without it");
    }
}

/// Global key locking: C's keys come from the prompt with the class word, so at the first
/// step the first cross-attention layer (whose queries C and F share) gives C exactly F's
/// maps; with local locking they differ. The file records the locking.
#[test]
fn global_locking_gives_c_the_keys_of_fs_prompt() {
    use infusion_repl::actions::{load_concept, train_concept};
    use infusion_repl::infusion::AttentionMaps;
    use infusion_repl::methods::ConceptRequest;
    use infusion_repl::{generate_pair, ConceptSet, PairOptions, Stream};
    let sd = tiny();
    let job = Job::quiet();
    let dir = tempfile::tempdir().unwrap();
    let layer = "down_blocks.0.attentions.0.transformer_blocks.0.attn2";
    let opts = PairOptions {
        generate: infusion_repl::GenerateOptions {
            steps: 2,
            seed: 9,
            ..Default::default()
        },
        ..Default::default()
    };
    for locking in ["local", "global"] {
        let out = dir.path().join(format!("{locking}.safetensors"));
        let mut a = ask(dir.path(), &out, None);
        (a.steps, a.checkpoint_every) = (Some(2), None);
        a.settings
            .insert("locking".into(), serde_json::json!(locking));
        train_concept(sd, &a.resolve().unwrap(), &job).unwrap();
        let found = infusion_repl::methods::Found::read(&out).unwrap();
        assert_eq!(found.meta("locking"), Some(locking));
        let mut set = ConceptSet::new();
        load_concept(
            &ConceptRequest {
                path: out,
                ..Default::default()
            },
            Some(sd),
            &mut set,
            &job,
        )
        .unwrap();
        let maps = AttentionMaps::new(true);
        let g = generate_pair(sd, &set, "a <pot> on a table", &opts, Some(&maps), &job).unwrap();
        let f = maps
            .layer_map(Stream::Foundational, layer, Some(0))
            .unwrap();
        let c = maps.layer_map(Stream::Customized, layer, Some(0)).unwrap();
        let off = max_abs(&(&c - &f).unwrap());
        match locking {
            "global" => assert!(off < 1e-6, "global: C's first maps are {off} off F's"),
            _ => assert!(off > 1e-6, "local: C's first maps equal F's"),
        }
        // The values' edit still changes C.
        assert!(max_abs(&(&g.custom_latents - &g.base_latents).unwrap()) > 1e-5);
    }
}
