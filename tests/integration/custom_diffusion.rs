//! Custom Diffusion against diffusers' `train_custom_diffusion.py` on the tiny model
//! (tests/fixtures/baselines/custom_diffusion, made by tools/make_custom_diffusion_fixtures.py
//! with diffusers 0.42.1 / torch 2.11.0 on the CPU): one training step (the masked loss, every
//! trained projection's gradient, the modifier token's, the AdamW update) and a generation with
//! the script's files loaded; then the flows users run (train, save, load, generate, resume).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, Var};
use infusion_repl::methods::ProjectionsHook;
use infusion_repl::methods::{text_states, Embedding};
use infusion_repl::{Branch, Job};

use crate::common::{assert_close, copy_dir, get, max_abs, repo, tiny};

fn fixture(name: &str) -> PathBuf {
    repo()
        .join("tests/fixtures/baselines/custom_diffusion")
        .join(name)
}

fn load(name: &str) -> HashMap<String, Tensor> {
    infusion_repl::sd::load_safetensors(&fixture(name), &Device::Cpu).unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(candle_core::DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()[0]
}

/// The cross-attention layers' paths of the tiny model.
fn layers() -> Vec<String> {
    tiny()
        .unet
        .attention_layers()
        .into_iter()
        .filter(|l| l.kind == infusion_repl::AttnKind::CrossAttention)
        .map(|l| l.path.clone())
        .collect()
}

/// One training step: the masked loss (1e-4 relative), the gradient of every key and value
/// projection and of the modifier token's vector (1e-4 of their scale), the total norm before
/// clipping (1e-4 relative; under 1, so clipping changes nothing), and one AdamW step (lr 2e-5,
/// weight decay 1e-2) within 2e-5 absolute (some gradients are near Adam's eps, where the step
/// is sensitive, as the fixture's README says).
#[test]
fn a_custom_diffusion_training_step_matches_diffusers() {
    let s = load("steps.safetensors");
    let sd = tiny();
    // The modifier token starts as the vocabulary entry `ktn`'s row, as the script does.
    let init_id = get(&s, "cd.init_token_id").to_vec1::<i64>().unwrap()[0] as u32;
    assert_eq!(sd.tokenizer.token_to_id("ktn"), Some(init_id));
    let init = get(&s, "cd.init.token");
    let row = sd
        .text_encoder
        .embed_tokens(&Tensor::new(&[[init_id]], &Device::Cpu).unwrap())
        .unwrap()
        .squeeze(0)
        .unwrap();
    assert_eq!(max_abs(&(&row - init).unwrap()), 0.0);
    // The trained parameters, as the learner makes them: the model's own projections.
    let mut vars: BTreeMap<String, Var> =
        BTreeMap::from([("token".to_string(), Var::from_tensor(init).unwrap())]);
    for layer in layers() {
        let attn = sd.unet.attention(&layer).unwrap();
        for (part, p) in [
            (
                "to_k_custom_diffusion.weight",
                infusion_repl::Projection::Key,
            ),
            (
                "to_v_custom_diffusion.weight",
                infusion_repl::Projection::Value,
            ),
        ] {
            let (w, _) = attn.projection(p);
            vars.insert(format!("{layer}.{part}"), Var::from_tensor(w).unwrap());
        }
    }
    // "photo of a <new1> cat": the stand-in `ktn` (two tokens here) gives way to the vector.
    let tokens = sd.tokenize("photo of a ktn cat").unwrap();
    let stand_in = tokens.positions_of_span(11..14);
    assert_eq!(stand_in.len(), 2, "ktn is two tokens in this vocabulary");
    let e = Embedding {
        token: "<new1>".into(),
        vectors: vars["token"].as_tensor().clone(),
    };
    let states = text_states(sd, &tokens, stand_in[0]..stand_in[1] + 1, &e).unwrap();
    // The ids C's text encoder saw are the script's, with <new1> in the stand-in's place.
    let ids = get(&s, "cd.ids").to_vec2::<i64>().unwrap();
    assert_eq!(ids[0][4], 49408);
    let weights: BTreeMap<String, Tensor> = vars
        .iter()
        .filter(|(k, _)| k.as_str() != "token")
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    let hook = ProjectionsHook::new(&weights, sd, None, true).unwrap();
    let (latents, noise) = (get(&s, "batch.latents"), get(&s, "batch.noise"));
    let mask = get(&s, "batch.mask");
    let ts: Vec<usize> = get(&s, "batch.timesteps")
        .to_vec1::<i64>()
        .unwrap()
        .iter()
        .map(|&t| t as usize)
        .collect();
    let z = sd.scheduler.add_noise(latents, noise, &ts).unwrap();
    let t = Tensor::new(
        ts.iter().map(|&t| t as f32).collect::<Vec<_>>(),
        &Device::Cpu,
    )
    .unwrap();
    let ctx = Tensor::cat(&[&states, &states], 0).unwrap();
    let rows =
        infusion_repl::BatchLayout::uniform(2, Branch(1), infusion_repl::Guidance::Conditional);
    let ctx_hook = infusion_repl::HookCtx {
        hook: &hook,
        rows: &rows,
        step: None,
    };
    let pred = sd.unet.forward(&z, &t, &ctx, Some(&ctx_hook)).unwrap();
    let err = (pred - noise).unwrap().sqr().unwrap();
    let loss = (err.broadcast_mul(mask).unwrap().sum((1, 2, 3)).unwrap()
        / mask.sum((1, 2, 3)).unwrap())
    .unwrap()
    .mean_all()
    .unwrap();
    let want = scalar(get(&s, "cd.loss"));
    assert!(
        (scalar(&loss) - want).abs() <= 1e-4 * want,
        "loss {} vs {want}",
        scalar(&loss)
    );
    let grads = loss.backward().unwrap();
    let mut g = infusion_repl::train::gradients(&grads, &vars, 1.0).unwrap();
    for (k, v) in &g {
        let want = if k == "token" {
            get(&s, "cd.grad.token")
        } else {
            get(&s, &format!("cd.grad.{k}"))
        };
        assert_close(v, want, 1e-4, k);
    }
    let norm = infusion_repl::train::clip_grad_norm(&mut g, 1.0).unwrap();
    let want = scalar(get(&s, "cd.grad_norm"));
    assert!((norm - want).abs() <= 1e-4 * want, "norm {norm} vs {want}");
    let mut opt = infusion_repl::train::AdamW::new(2e-5, 1e-2, &vars).unwrap();
    opt.update(&vars, &g).unwrap();
    for (k, v) in &vars {
        let want = if k == "token" {
            get(&s, "cd.after.token")
        } else {
            get(&s, &format!("cd.after.{k}"))
        };
        let off = max_abs(&(v.as_tensor() - want).unwrap());
        assert!(off <= 2e-5, "{k} after the step: {off} off");
    }
}

/// The script's files, loaded by `load_concept` (with the class word they do not record), give
/// C diffusers' latents (3 DDIM steps, 1e-3 relative) and F the plain model's.
#[test]
fn the_scripts_files_generate_what_diffusers_generates() {
    use infusion_repl::actions::load_concept;
    use infusion_repl::methods::ConceptRequest;
    use infusion_repl::{generate_pair, ConceptSet, PairOptions};
    let g = load("generation.safetensors");
    let sd = tiny();
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("pot-cd");
    std::fs::create_dir(&folder).unwrap();
    for f in [
        "pytorch_custom_diffusion_weights.safetensors",
        "<new1>.safetensors",
    ] {
        std::fs::copy(fixture(f), folder.join(f)).unwrap();
    }
    let mut set = ConceptSet::new();
    let job = Job::quiet();
    let c = load_concept(
        &ConceptRequest {
            path: folder.clone(),
            name: Some("pot".into()),
            word: Some("cat".into()),
            ..Default::default()
        },
        Some(sd),
        &mut set,
        &job,
    )
    .unwrap();
    assert_eq!(c.method(), "custom_diffusion");
    assert!(c.summary().contains("<new1> cat"), "{}", c.summary());
    let opts = PairOptions {
        generate: infusion_repl::GenerateOptions {
            steps: 3,
            guidance: 7.5,
            noise: Some(get(&g, "init_noise").clone()),
            ..Default::default()
        },
        replace_steps: 1.0,
    };
    let out = generate_pair(
        sd,
        &set,
        "a photo of a <pot> sitting by a teapot",
        &opts,
        None,
        &job,
    )
    .unwrap();
    assert_close(&out.custom_latents, get(&g, "cd.latents"), 1e-3, "C");
    assert_close(&out.base_latents, get(&g, "plain.latents"), 1e-3, "F");
    // The script's own name for the token file (safetensors inside a .bin) reads the same.
    let bin = dir.path().join("bin");
    copy_dir(&folder, &bin);
    std::fs::rename(bin.join("<new1>.safetensors"), bin.join("<new1>.bin")).unwrap();
    let mut again = ConceptSet::new();
    let c = load_concept(
        &ConceptRequest {
            path: bin,
            name: Some("pot".into()),
            word: Some("cat".into()),
            ..Default::default()
        },
        Some(sd),
        &mut again,
        &job,
    )
    .unwrap();
    assert_eq!(c.method(), "custom_diffusion");
}

/// Trained in a session, saved as the script's two files (and our record), loaded back with
/// the path alone: the same C; resumed from a checkpoint: the same run.
#[test]
fn custom_diffusion_trains_saves_loads_and_resumes() {
    use infusion_repl::actions::{load_concept, train_concept, TrainAsk};
    use infusion_repl::methods::ConceptRequest;
    use infusion_repl::{generate_pair, ConceptSet, PairOptions};
    let sd = tiny();
    let job = Job::quiet();
    let dir = tempfile::tempdir().unwrap();
    let ask = |resume: Option<PathBuf>, out: &Path| TrainAsk {
        folder: repo().join("assets/example-concept"),
        name: "pot".into(),
        word: "teapot".into(),
        method: Some("custom_diffusion".into()),
        steps: Some(4),
        lr: Some(1e-3),
        checkpoint_every: Some(2),
        checkpoint_dir: Some(dir.path().join("ck")),
        resume,
        out: Some(out.to_path_buf()),
        ..Default::default()
    };
    let a = dir.path().join("a");
    let full = train_concept(sd, &ask(None, &a).resolve().unwrap(), &job).unwrap();
    assert_eq!(full.losses.len(), 4);
    assert!(full.losses.iter().all(|l| l.is_finite()));
    for f in [
        "pytorch_custom_diffusion_weights.safetensors",
        "<new1>.safetensors",
        "infusion_concept.json",
    ] {
        assert!(a.join(f).is_file(), "{f} not written");
    }
    let b = dir.path().join("b");
    let resumed = train_concept(
        sd,
        &ask(Some(full.checkpoints[0].clone()), &b)
            .resolve()
            .unwrap(),
        &job,
    )
    .unwrap();
    assert_eq!(resumed.losses, full.losses[2..]);
    let w = "pytorch_custom_diffusion_weights.safetensors";
    let (wa, wb) = (
        infusion_repl::sd::load_safetensors(&a.join(w), &Device::Cpu).unwrap(),
        infusion_repl::sd::load_safetensors(&b.join(w), &Device::Cpu).unwrap(),
    );
    for (k, t) in &wa {
        assert_eq!(max_abs(&(t - &wb[k]).unwrap()), 0.0, "{k}");
    }
    // Loaded with the path alone (our record names it and its word), it is what the session
    // trained: C's latents equal the session concept's.
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
            path: a,
            ..Default::default()
        },
        Some(sd),
        &mut loaded,
        &job,
    )
    .unwrap();
    assert_eq!((c.name(), c.word()), ("pot", "teapot"));
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
}
