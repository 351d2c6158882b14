//! The baseline methods' files and pieces against diffusers (tests/fixtures/baselines, made by
//! tools/make_baseline_fixtures.py with diffusers 0.42.1 / peft 0.21.2):
//! - the TI and LoRA files users have are told apart and read: diffusers' and A1111's
//!   embeddings give the same vector (exact), diffusers' and kohya's LoRA the same factors
//!   (exact), with kohya's alpha; bad files are refused with the file and the tensor named;
//! - a learned word placed in a prompt generates what diffusers generates after
//!   `load_textual_inversion` (3 DDIM steps, the txt2img tolerance 1e-3 relative).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use infusion_repl::methods::text_states;
use infusion_repl::methods::Found;
use infusion_repl::methods::{read_embedding, Embedding};
use infusion_repl::methods::{read_lora, LoraFile, LoraLayout};
use infusion_repl::sd::{Denoise, Trajectory};
use infusion_repl::{Branch, GenerateOptions, Job};

use crate::common::{assert_close, get, max_abs, repo, tiny};

fn fixture(name: &str) -> PathBuf {
    repo().join("tests/fixtures/baselines").join(name)
}

fn generation() -> std::collections::HashMap<String, Tensor> {
    infusion_repl::sd::load_safetensors(&fixture("generation.safetensors"), &Device::Cpu).unwrap()
}

/// The settings of the generation references: 3 DDIM steps, guidance 7.5, their noise.
fn reference_options(g: &std::collections::HashMap<String, Tensor>) -> GenerateOptions {
    GenerateOptions {
        steps: 3,
        guidance: 7.5,
        noise: Some(get(g, "init_noise").clone()),
        ..Default::default()
    }
}

/// A script engine of its own session, without images or progress bars.
fn script_engine() -> rhai::Engine {
    use infusion_repl::app::{build_engine, ScriptConfig, Session};
    build_engine(&Session::new(ScriptConfig {
        no_images: true,
        progress: false,
        ..ScriptConfig::default()
    }))
}

fn embedding(path: &Path) -> Embedding {
    read_embedding(&Found::read(path).unwrap()).unwrap()
}

fn lora(path: &Path) -> LoraFile {
    read_lora(&Found::read(path).unwrap()).unwrap()
}

/// The error of taking the file at `path` in as a concept (with a class word, which files of
/// other tools need).
fn read_err(path: &Path) -> String {
    let req = infusion_repl::methods::ConceptRequest {
        path: path.to_path_buf(),
        word: Some("cat".into()),
        ..Default::default()
    };
    infusion_repl::methods::load(&req, None, &Job::quiet())
        .unwrap_err()
        .to_string()
}

#[test]
fn embeddings_of_diffusers_and_a1111_are_read_alike() {
    let g = generation();
    let d = embedding(&fixture("learned_embeds.safetensors"));
    assert_eq!(d.token, "<thing>");
    assert_eq!(max_abs(&(&d.vectors - get(&g, "ti.vector")).unwrap()), 0.0);
    let a = embedding(&fixture("a1111_embedding.safetensors"));
    assert_eq!(a.token, "a1111_embedding");
    assert_eq!(max_abs(&(&a.vectors - &d.vectors).unwrap()), 0.0);
}

#[test]
fn loras_of_diffusers_and_kohya_are_read_alike() {
    let d = lora(&fixture("pytorch_lora_weights.safetensors"));
    assert_eq!(d.layout, LoraLayout::Diffusers);
    // to_q, to_k, to_v, to_out.0 of attn1 and attn2 in 6 transformer blocks.
    assert_eq!(d.unet_layers().count(), 48);
    assert_eq!(d.text_encoder_layers().count(), 0);
    let k = lora(&fixture("kohya_lora.safetensors"));
    assert_eq!(k.layout, LoraLayout::Kohya);
    assert_eq!(k.layers.len(), 48);
    for l in &d.layers {
        assert_eq!(l.rank(), 4, "{}", l.module);
        assert_eq!(l.alpha_scale(), 1.0);
        let kohya_name = l.module.replace('.', "_");
        let m = k
            .layers
            .iter()
            .find(|x| x.module == kohya_name)
            .unwrap_or_else(|| panic!("kohya file lacks {kohya_name}"));
        assert_eq!(m.alpha, Some(4.0));
        assert_eq!(max_abs(&(&m.down - &l.down).unwrap()), 0.0);
        assert_eq!(max_abs(&(&m.up - &l.up).unwrap()), 0.0);
    }
    // The factors are the state the reference step started from (names as written).
    let steps =
        infusion_repl::sd::load_safetensors(&fixture("steps.safetensors"), &Device::Cpu).unwrap();
    let l = &d.layers[0];
    let state = get(
        &steps,
        &format!("lora.state.unet.{}.lora.down.weight", l.module),
    );
    assert_eq!(max_abs(&(state - &l.down).unwrap()), 0.0);
}

/// Writes `tensors` as a safetensors file in `dir` and returns the reader's error.
fn refused(dir: &Path, name: &str, tensors: &[(&str, Tensor)]) -> String {
    let path = dir.join(name);
    let map: std::collections::HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, t)| (k.to_string(), t.clone()))
        .collect();
    candle_core::safetensors::save(&map, &path).unwrap();
    let e = read_err(&path);
    assert!(e.contains(name), "the error does not name the file: {e}");
    e
}

#[test]
fn files_that_fit_no_layout_are_refused_with_what_they_hold() {
    let dir = tempfile::tempdir().unwrap();
    let z = |d: &[usize]| Tensor::zeros(d, DType::F32, &Device::Cpu).unwrap();
    let e = refused(
        dir.path(),
        "sdxl.safetensors",
        &[("clip_g", z(&[1, 1280])), ("clip_l", z(&[1, 768]))],
    );
    assert!(e.contains("SDXL"), "{e}");
    let e = refused(
        dir.path(),
        "xl_lora.safetensors",
        &[(
            "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight",
            z(&[4, 1280]),
        )],
    );
    assert!(e.contains("SDXL") && e.contains("lora_te2_"), "{e}");
    let e = refused(
        dir.path(),
        "other.safetensors",
        &[("a", z(&[2])), ("b", z(&[2])), ("c", z(&[2]))],
    );
    assert!(
        e.contains("no known concept layout") && e.contains("`a`"),
        "{e}"
    );
    let e = refused(dir.path(), "cube.safetensors", &[("<x>", z(&[1, 2, 3]))]);
    assert!(e.contains("`<x>`") && e.contains("[1, 2, 3]"), "{e}");
    let e = refused(
        dir.path(),
        "half.safetensors",
        &[(
            "unet.down_blocks.0.attn1.to_q.lora.down.weight",
            z(&[4, 32]),
        )],
    );
    assert!(e.contains("lora.up.weight"), "{e}");
    let e = refused(
        dir.path(),
        "ranks.safetensors",
        &[
            ("unet.m.lora.down.weight", z(&[4, 32])),
            ("unet.m.lora.up.weight", z(&[32, 2])),
        ],
    );
    assert!(e.contains("rank 4"), "{e}");
    // A truncated file.
    let good = std::fs::read(fixture("learned_embeds.safetensors")).unwrap();
    let cut = dir.path().join("cut.safetensors");
    std::fs::write(&cut, &good[..good.len() - 10]).unwrap();
    let e = read_err(&cut);
    assert!(e.contains("cut.safetensors"), "{e}");
    // Our own concepts are sent to their loader.
    let ours = dir.path().join("mine.safetensors");
    infusion_repl::Concept::zeros("mine", "cat", tiny().unet.attention_layers(), None)
        .unwrap()
        .save(&ours, DType::F32)
        .unwrap();
    let found = Found::read(&ours).unwrap();
    assert!(infusion_repl::methods::REGISTRY
        .iter()
        .find(|m| m.claims(&found))
        .is_some_and(|m| m.name() == "infusion"));
}

#[test]
fn a_learned_word_generates_what_diffusers_generates() {
    let g = generation();
    let sd = tiny();
    let prompt = "a photo of a cat sitting by a teapot";
    let tokens = sd.tokenize(prompt).unwrap();
    let neg = sd.tokenize("").unwrap();
    let plain = sd.text_states(&[&neg, &tokens]).unwrap();
    let span = tokens.positions_of_word(prompt, "cat")[0].clone();
    let span = span[0]..span[span.len() - 1] + 1;
    let e = embedding(&fixture("learned_embeds.safetensors"));
    let learned = text_states(sd, &tokens, span, &e).unwrap();
    let opts = reference_options(&g);
    let init = sd.initial_latents(&opts).unwrap();
    let traj = |branch, cond: Tensor| Trajectory {
        branch,
        sample: 0,
        uncond: plain.get(0).unwrap().unsqueeze(0).unwrap(),
        cond,
    };
    let out = sd
        .denoise(
            &Denoise::new(
                &init,
                &[
                    traj(Branch(0), plain.get(1).unwrap().unsqueeze(0).unwrap()),
                    traj(Branch(1), learned),
                ],
                &opts,
            ),
            &Job::quiet(),
            &mut |_| Ok(()),
        )
        .unwrap();
    assert_close(&out[0], get(&g, "plain.latents"), 1e-3, "plain word");
    assert_close(&out[1], get(&g, "ti.latents"), 1e-3, "learned word");

    // A vector of another width is refused with both widths.
    let wide = Embedding {
        token: "<wide>".into(),
        vectors: Tensor::zeros((1, 768), DType::F32, &Device::Cpu).unwrap(),
    };
    let err = text_states(sd, &tokens, 5..6, &wide)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("768") && err.contains("32") && err.contains("<wide>"),
        "{err}"
    );
}

/// F (plain) and C (with `hook` on branch 1) for `prompt`, 3 steps from the reference noise.
fn pair_with(hook: &dyn infusion_repl::AttentionHook, prompt: &str) -> Vec<Tensor> {
    let g = generation();
    let sd = tiny();
    let states = sd
        .text_states(&[&sd.tokenize("").unwrap(), &sd.tokenize(prompt).unwrap()])
        .unwrap();
    let opts = reference_options(&g);
    let traj = |b| Trajectory {
        branch: Branch(b),
        sample: 0,
        uncond: states.get(0).unwrap().unsqueeze(0).unwrap(),
        cond: states.get(1).unwrap().unsqueeze(0).unwrap(),
    };
    sd.denoise(
        &Denoise::new(
            &sd.initial_latents(&opts).unwrap(),
            &[traj(0), traj(1)],
            &opts,
        )
        .hook(Some(hook)),
        &Job::quiet(),
        &mut |_| Ok(()),
    )
    .unwrap()
}

#[test]
fn a_lora_on_c_generates_what_diffusers_generates_and_f_stays_plain() {
    use infusion_repl::methods::LoraHook;
    let g = generation();
    let sd = tiny();
    let prompt = "a photo of sks cat by a teapot";
    let plain = sd
        .generate(prompt, &reference_options(&g), &Job::quiet())
        .unwrap()
        .latents;
    for (file, scale, reference) in [
        ("pytorch_lora_weights.safetensors", 1.0, "lora.latents"),
        ("kohya_lora.safetensors", 1.0, "lora.latents"),
        ("pytorch_lora_weights.safetensors", 0.5, "lora_half.latents"),
    ] {
        let hook = LoraHook::new(&lora(&fixture(file)), sd, scale, Some(Branch(1))).unwrap();
        let out = pair_with(&hook, prompt);
        assert_close(
            &out[1],
            get(&g, reference),
            1e-3,
            &format!("{file} at {scale}"),
        );
        // F is the plain image (to 1e-4: a batch of 4 rows rounds the UNet's sums otherwise
        // than a batch of 2).
        assert_close(&out[0], &plain, 1e-4, "F beside the LoRA");
    }
}

#[test]
fn a_lora_of_other_shapes_or_modules_is_refused_with_the_layer() {
    use infusion_repl::methods::LoraHook;
    use infusion_repl::methods::{LoraFile as Lora, LoraLayer, LoraTarget};
    let z = |d: &[usize]| Tensor::zeros(d, DType::F32, &Device::Cpu).unwrap();
    let layer = |module: &str, down: &[usize], up: &[usize], target| LoraLayer {
        target,
        module: module.into(),
        down: z(down),
        up: z(up),
        alpha: None,
    };
    let q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
    let one = |l: LoraLayer| Lora {
        layout: LoraLayout::Diffusers,
        layers: vec![l],
    };
    let err = |l: Lora| {
        LoraHook::new(&l, tiny(), 1.0, None)
            .err()
            .unwrap()
            .to_string()
    };
    let e = err(one(layer(q, &[4, 320], &[320, 4], LoraTarget::Unet)));
    assert!(
        e.contains(q) && e.contains("[4, 320]") && e.contains("[32, 32]"),
        "{e}"
    );
    // A ResNet convolution (LyCORIS' LoCon) is no module a LoRA adapts here.
    let e = err(one(layer(
        "down_blocks.0.resnets.0.conv1",
        &[4, 32],
        &[32, 4],
        LoraTarget::Unet,
    )));
    assert!(
        e.contains("resnets.0.conv1") && e.contains("not a module a LoRA can adapt"),
        "{e}"
    );
    let e = err(one(layer(
        "text_model.encoder.layers.0.mlp.fc1",
        &[4, 32],
        &[32, 4],
        LoraTarget::TextEncoder,
    )));
    assert!(
        e.contains("mlp.fc1") && e.contains("[4, 32]") && e.contains("[64, 32]"),
        "{e}"
    );
}

/// A LoRA of every module kohya's scripts adapt (the UNet's attention projections, `proj_in`,
/// `proj_out` (1x1 convolutions here) and feed-forward linears, and the text encoder's linears),
/// in kohya's names (alpha 8 at rank 4) and in the mixed names diffusers' training script writes:
/// C generates what the pipeline with the LoRA merged into its weights generates
/// (tests/fixtures/baselines/modules, tools/make_lora_modules_fixtures.py; diffusers' loader
/// agrees on the kohya file), at strength 1 and 0.5 (the text encoder's layers scaled too), and
/// differs from the UNet entries alone; F stays plain. 3 DDIM steps, 1e-3 relative.
#[test]
fn a_lora_of_every_module_and_the_text_encoder_generates_the_merged_model() {
    use infusion_repl::actions::load_concept;
    use infusion_repl::methods::ConceptRequest;
    use infusion_repl::{generate_pair, ConceptSet, PairOptions};
    let sd = tiny();
    let dir = repo().join("tests/fixtures/baselines/modules");
    let refs =
        infusion_repl::sd::load_safetensors(&dir.join("generation.safetensors"), &Device::Cpu)
            .unwrap();
    let opts = PairOptions {
        generate: reference_options(&refs),
        replace_steps: 1.0,
    };
    let job = Job::quiet();
    let plain = sd
        .generate("a photo of cat by a teapot", &opts.generate, &Job::quiet())
        .unwrap()
        .latents;
    for (file, scale, key) in [
        ("full_lora.safetensors", 1.0, "full.latents"),
        ("kohya_full_lora.safetensors", 1.0, "full.latents"),
        ("kohya_full_lora.safetensors", 0.5, "full_half.latents"),
    ] {
        let mut set = ConceptSet::new();
        let req = ConceptRequest {
            path: dir.join(file),
            name: Some("it".into()),
            word: Some("cat".into()),
            trigger: Some("sks".into()),
            scale: Some(scale),
            ..Default::default()
        };
        load_concept(&req, Some(sd), &mut set, &job).unwrap();
        let out =
            generate_pair(sd, &set, "a photo of <it> by a teapot", &opts, None, &job).unwrap();
        let what = format!("{file} at {scale}");
        assert_close(&out.custom_latents, get(&refs, key), 1e-3, &what);
        assert!(
            max_abs(&(&out.custom_latents - get(&refs, "unet_only.latents")).unwrap()) > 1e-3,
            "{what}: the text encoder's layers changed nothing"
        );
        assert_close(&out.base_latents, &plain, 1e-4, "F beside the LoRA");
    }
}

/// The DDPM loss of the reference batch (steps.safetensors `batch.*`) for `prompt`'s text states
/// `states` (1, tokens, width), with `hook` on every row.
fn ddpm_loss(
    steps: &std::collections::HashMap<String, Tensor>,
    states: &Tensor,
    hook: Option<&dyn infusion_repl::AttentionHook>,
) -> Tensor {
    let sd = tiny();
    let (latents, noise) = (get(steps, "batch.latents"), get(steps, "batch.noise"));
    let ts: Vec<usize> = get(steps, "batch.timesteps")
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
    let ctx = Tensor::cat(&[states, states], 0).unwrap();
    let rows =
        infusion_repl::BatchLayout::uniform(2, Branch(1), infusion_repl::Guidance::Conditional);
    let hook = hook.map(|hook| infusion_repl::HookCtx {
        hook,
        rows: &rows,
        step: None,
    });
    let pred = sd.unet.forward(&z, &t, &ctx, hook.as_ref()).unwrap();
    (pred - noise).unwrap().sqr().unwrap().mean_all().unwrap()
}

fn steps_fixture() -> std::collections::HashMap<String, Tensor> {
    infusion_repl::sd::load_safetensors(&fixture("steps.safetensors"), &Device::Cpu).unwrap()
}

fn scalar(t: &Tensor) -> f32 {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0]
}

/// One training step of DreamBooth-LoRA: the loss and every factor's gradient equal peft's
/// (1e-4 relative: one UNet forward and backward in f32).
#[test]
fn a_lora_training_step_matches_peft() {
    use candle_core::Var;
    use infusion_repl::methods::LoraHook;
    use infusion_repl::methods::{LoraFile as Lora, LoraLayer, LoraTarget};
    let s = steps_fixture();
    let sd = tiny();
    let mut vars = vec![];
    let mut layers = vec![];
    let file = lora(&fixture("pytorch_lora_weights.safetensors"));
    for l in file.unet_layers() {
        let key = |f: &str| format!("lora.state.unet.{}.lora.{f}.weight", l.module);
        let down = Var::from_tensor(get(&s, &key("down"))).unwrap();
        let up = Var::from_tensor(get(&s, &key("up"))).unwrap();
        layers.push(LoraLayer {
            target: LoraTarget::Unet,
            module: l.module.clone(),
            down: down.as_tensor().clone(),
            up: up.as_tensor().clone(),
            alpha: None,
        });
        vars.push((l.module.clone(), down, up));
    }
    let hook = LoraHook::new(
        &Lora {
            layout: LoraLayout::Diffusers,
            layers,
        },
        sd,
        1.0,
        None,
    )
    .unwrap();
    let tokens = sd.tokenize("a photo of sks cat").unwrap();
    let states = sd.text_states(&[&tokens]).unwrap();
    let loss = ddpm_loss(&s, &states, Some(&hook));
    let want = scalar(get(&s, "lora.loss"));
    assert!(
        (scalar(&loss) - want).abs() <= 1e-4 * want,
        "loss {} vs {want}",
        scalar(&loss)
    );
    let grads = loss.backward().unwrap();
    for (module, down, up) in &vars {
        for (f, var) in [("down", down), ("up", up)] {
            let g = grads.get(var.as_tensor()).unwrap();
            let want = get(&s, &format!("lora.grad.unet.{module}.lora.{f}.weight"));
            assert_close(g, want, 1e-4, &format!("{module} {f}"));
        }
    }
}

/// One training step of Textual Inversion: the loss, the new row's gradient, and the row after
/// one AdamW step (lr 5e-4, weight decay 1e-2) equal the diffusers script's (1e-4 relative).
#[test]
fn a_textual_inversion_training_step_matches_diffusers() {
    use candle_core::Var;
    use Embedding;
    let s = steps_fixture();
    let sd = tiny();
    let prompt = "a photo of a cat";
    let tokens = sd.tokenize(prompt).unwrap();
    let init = get(&s, "ti.init").clone();
    // The row starts as cat's own embedding, as the script initialises it.
    let cat = sd.tokenize("cat").unwrap().ids[1];
    let cat_row = sd
        .text_encoder
        .embed_tokens(&Tensor::new(&[[cat]], &Device::Cpu).unwrap())
        .unwrap()
        .squeeze(0)
        .unwrap();
    assert_eq!(max_abs(&(&cat_row - &init).unwrap()), 0.0);
    let var = Var::from_tensor(&init).unwrap();
    let e = Embedding {
        token: "<thing>".into(),
        vectors: var.as_tensor().clone(),
    };
    let states = text_states(sd, &tokens, 5..6, &e).unwrap();
    let loss = ddpm_loss(&s, &states, None);
    let want = scalar(get(&s, "ti.loss"));
    assert!(
        (scalar(&loss) - want).abs() <= 1e-4 * want,
        "loss {} vs {want}",
        scalar(&loss)
    );
    let grads = loss.backward().unwrap();
    let g = grads.get(var.as_tensor()).unwrap().clone();
    assert_close(&g, get(&s, "ti.grad"), 1e-4, "the new row's gradient");
    let vars = std::collections::BTreeMap::from([("<thing>".to_string(), var.clone())]);
    let mut opt = infusion_repl::train::AdamW::new(5e-4, 1e-2, &vars).unwrap();
    opt.update(
        &vars,
        &std::collections::BTreeMap::from([("<thing>".to_string(), g)]),
    )
    .unwrap();
    assert_close(
        var.as_tensor(),
        get(&s, "ti.after"),
        1e-4,
        "the row after one AdamW step",
    );
}

/// Concepts of the other methods in a session's prompts: F sees the class word, C the learned
/// word or the LoRA (with its trigger word); C equals diffusers' image of the same concept, F the
/// plain one, and a prompt without marks stays plain SD.
#[test]
fn adapted_concepts_generate_through_the_session_pair() {
    use infusion_repl::methods::LoraConcept;
    use infusion_repl::methods::WordConcept;
    use infusion_repl::{generate_pair, ConceptSet, PairOptions};
    let g = generation();
    let sd = tiny();
    let mut set = ConceptSet::new();
    let job = Job::collecting();
    set.add(
        std::sync::Arc::new(WordConcept {
            name: "thing".into(),
            word: "cat".into(),
            embedding: embedding(&fixture("learned_embeds.safetensors")),
            origin: Default::default(),
        }) as infusion_repl::methods::ConceptRef,
        false,
        &job,
    );
    set.add(
        std::sync::Arc::new(LoraConcept {
            name: "sks".into(),
            word: "cat".into(),
            lora: lora(&fixture("kohya_lora.safetensors")),
            scale: 1.0,
            trigger: Some("sks".into()),
            origin: Default::default(),
        }) as infusion_repl::methods::ConceptRef,
        false,
        &job,
    );
    let opts = PairOptions {
        generate: reference_options(&g),
        replace_steps: 1.0,
    };
    let ti = generate_pair(
        sd,
        &set,
        "a photo of a <thing> sitting by a teapot",
        &opts,
        None,
        &job,
    )
    .unwrap();
    assert_close(
        &ti.base_latents,
        get(&g, "plain.latents"),
        1e-3,
        "F with a learned word",
    );
    assert_close(
        &ti.custom_latents,
        get(&g, "ti.latents"),
        1e-3,
        "C with a learned word",
    );
    assert_eq!(ti.concepts, ["thing"]);
    let lo = generate_pair(sd, &set, "a photo of <sks> by a teapot", &opts, None, &job).unwrap();
    assert_close(
        &lo.custom_latents,
        get(&g, "lora.latents"),
        1e-3,
        "C with the LoRA",
    );
    assert_eq!(lo.parsed.base, "a photo of cat by a teapot");
    // Without marks: plain SD, C is F.
    let plain = generate_pair(
        sd,
        &set,
        "a photo of a cat sitting by a teapot",
        &opts,
        None,
        &job,
    )
    .unwrap();
    assert!(!plain.is_customized());
    assert_close(
        &plain.base_latents,
        get(&g, "plain.latents"),
        1e-3,
        "no marks",
    );
    assert!(set.forget("sks") && !set.forget("sks"));
}

/// `load_concept` takes the TI and LoRA files users have in scripts: the method and size are
/// said, prompts use them, Infusion-only properties and missing class words are clear errors.
#[test]
fn scripts_load_and_use_ti_and_lora_files() {
    let engine = script_engine();
    let mut scope = rhai::Scope::new();
    scope.push("DIR", fixture("").display().to_string());
    let v: rhai::Array = engine
        .eval_with_scope(
            &mut scope,
            r#"let m = load_model();
               let t = load_concept(DIR + "/learned_embeds.safetensors", #{word: "cat"});
               let l = load_concept(DIR + "/kohya_lora.safetensors", #{name: "pot", word: "teapot", trigger: "sks", scale: 0.5});
               let g = m.generate("a <thing> next to a <pot>", #{steps: 2});
               [t.name, t.method, t.size_bytes, l.method, concepts().len(), g.concepts, `${l}`]"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let s: Vec<String> = v.iter().map(|x| x.to_string()).collect();
    assert_eq!(&s[..5], ["thing", "textual_inversion", "128", "lora", "2"]);
    assert!(s[5].contains("thing") && s[5].contains("pot"), "{}", s[5]);
    assert!(
        s[6].contains("sks teapot") && s[6].contains("scale 0.5"),
        "{}",
        s[6]
    );
    for (script, want) in [
        (
            r#"load_concept(DIR + "/learned_embeds.safetensors")"#,
            "word",
        ),
        (
            r#"load_concept(DIR + "/learned_embeds.safetensors", #{word: "cat"}).n_values"#,
            "Infusion concepts",
        ),
        (
            r#"load_concept(DIR + "/learned_embeds.safetensors", #{word: "cat", trigger: "sks"})"#,
            "trigger",
        ),
        (
            r#"load_concept(DIR + "/steps.safetensors", #{word: "cat"})"#,
            "steps.safetensors",
        ),
    ] {
        let e = engine
            .eval_with_scope::<rhai::Dynamic>(&mut scope, script)
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{script}: {e}");
    }
}

fn example_images() -> Vec<image::RgbImage> {
    let dir = repo().join("assets/example-concept");
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "png" || e == "jpg"))
        .collect();
    paths.sort();
    paths
        .iter()
        .map(|p| image::open(p).unwrap().to_rgb8())
        .collect()
}

/// Every method starts from the plain model: at their initial parameters (Δ = 0, the class
/// word's own vectors, LoRA's up factors 0) the three learners give the plain model's loss on
/// the same batch (1e-5 relative), and a few steps lower it on a fixed evaluation set.
#[test]
fn every_learner_starts_from_the_plain_model_and_learns() {
    use infusion_repl::infusion::trainer;
    use infusion_repl::methods::LearnedWord;
    use infusion_repl::methods::LoraLearner;
    use infusion_repl::train::{TrainOptions, Trainer};
    let sd = tiny();
    let images = example_images();
    let opts = |lr: f64| TrainOptions {
        steps: 8,
        lr,
        batch: 2,
        templates: vec!["a photo of a {}".into()],
        ..Default::default()
    };
    let mut infusion = trainer(sd, "pot", "teapot", &images, opts(0.05)).unwrap();
    let mut ti = Trainer::new(
        sd,
        "pot",
        "teapot",
        &images,
        opts(0.05),
        Box::new(LearnedWord::new(sd, "teapot").unwrap()),
    )
    .unwrap();
    let mut lora = Trainer::new(
        sd,
        "pot",
        "teapot",
        &images,
        opts(0.01),
        Box::new(LoraLearner::new(sd, 4, "sks", 0).unwrap()),
    )
    .unwrap();
    let plain = infusion.eval_loss(7, 8, true).unwrap();
    assert!((ti.eval_loss(7, 8, true).unwrap() - plain).abs() <= 1e-5 * plain);
    assert!((ti.eval_loss(7, 8, false).unwrap() - plain).abs() <= 1e-5 * plain);
    // LoRA's prompts say "sks teapot": the plain model's loss on those prompts, not on "teapot".
    let lora_plain = lora.eval_loss(7, 8, true).unwrap();
    assert!((lora.eval_loss(7, 8, false).unwrap() - lora_plain).abs() <= 1e-5 * lora_plain);
    for (name, t, before) in [
        ("infusion", &mut infusion, plain),
        ("textual_inversion", &mut ti, plain),
        ("lora", &mut lora, lora_plain),
    ] {
        t.run(&Job::quiet()).unwrap();
        let after = t.eval_loss(7, 8, false).unwrap();
        assert!(after < before, "{name}: eval loss {before} -> {after}");
    }
}

/// Trained from a script, a LoRA and a learned word join the session, generate, and are saved
/// in the layouts diffusers reads: the LoRA under exactly the names diffusers' own
/// `save_lora_weights` wrote for this model, the word as `{"<name>": [1, 32]}`.
#[test]
fn scripts_train_save_and_use_lora_and_ti_concepts() {
    let dir = tempfile::tempdir().unwrap();
    let engine = script_engine();
    let mut scope = rhai::Scope::new();
    scope.push(
        "IMAGES",
        repo().join("assets/example-concept").display().to_string(),
    );
    scope.push("OUT", dir.path().display().to_string());
    let v: rhai::Array = engine
        .eval_with_scope(
            &mut scope,
            r#"let m = load_model();
               let l = m.train_concept(IMAGES, "pot", "teapot", #{method: "lora", train_steps: 2, batch: 1});
               let t = m.train_concept(IMAGES, "word", "teapot", #{method: "textual_inversion", train_steps: 2, batch: 1,
                                                                 checkpoint_every: 1, checkpoint_dir: OUT + "/ck"});
               l.save(OUT + "/pot_lora.safetensors");
               t.save(OUT + "/word.safetensors");
               let g = m.generate("a <pot> and a <word>", #{steps: 2});
               let r = m.train_concept(IMAGES, "word", "teapot", #{resume: OUT + "/ck/word-step000001.safetensors"});
               r.save(OUT + "/resumed.safetensors");
               [l.method, t.method, g.concepts.len(), r.method]"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let s: Vec<String> = v.iter().map(|x| x.to_string()).collect();
    assert_eq!(s, ["lora", "textual_inversion", "2", "textual_inversion"]);
    // Resumed from step 1 to the run's own 2 steps: the same vectors.
    same_tensors(
        &dir.path().join("word.safetensors"),
        &dir.path().join("resumed.safetensors"),
    );
    let ours =
        infusion_repl::sd::load_safetensors(&dir.path().join("pot_lora.safetensors"), &Device::Cpu)
            .unwrap();
    let theirs = infusion_repl::sd::load_safetensors(
        &fixture("pytorch_lora_weights.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let mut a: Vec<_> = ours.keys().collect();
    let mut b: Vec<_> = theirs.keys().collect();
    a.sort();
    b.sort();
    assert_eq!(a, b);
    for (k, t) in &ours {
        assert_eq!(t.dims(), theirs[k].dims(), "{k}");
    }
    let e = embedding(&dir.path().join("word.safetensors"));
    assert_eq!(
        (e.token.as_str(), e.vectors.dims()),
        ("<word>", &[1usize, 32][..])
    );
}

/// The Fisher divergence takes the other methods' concepts: positive where a prompt names them
/// (a learned word changes C's text, a LoRA its attention), zero on prompts that do not, and
/// (to rounding) zero for a "learned" word that is the class word's own embedding.
#[test]
fn fisher_divergence_measures_learned_words_and_loras() {
    use infusion_repl::methods::ConceptRef;
    use infusion_repl::methods::LoraConcept;
    use infusion_repl::methods::WordConcept;
    use infusion_repl::metrics::{fisher_divergence, FisherOptions, Variant};
    use infusion_repl::ConceptSet;
    let sd = tiny();
    let job = Job::quiet();
    let opts = FisherOptions {
        samples: 4,
        gen_steps: 2,
        ..Default::default()
    };
    let set = |concept: ConceptRef| {
        let mut s = ConceptSet::new();
        s.add(concept, false, &job);
        s
    };
    let word = |embedding: Embedding| -> ConceptRef {
        std::sync::Arc::new(WordConcept {
            name: "x".into(),
            word: "cat".into(),
            embedding,
            origin: Default::default(),
        })
    };
    let prompts = |p: &[&str]| p.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let marked = prompts(&["a photo of a <x>", "a <x> on a mat"]);
    let fisher = |s: &ConceptSet, p: &[String]| {
        fisher_divergence(sd, &Variant::Base, &Variant::Concepts(s), p, &opts, &job)
            .unwrap()
            .mean
    };
    let ti = set(word(embedding(&fixture("learned_embeds.safetensors"))));
    let lo = set(std::sync::Arc::new(LoraConcept {
        name: "x".into(),
        word: "cat".into(),
        lora: lora(&fixture("pytorch_lora_weights.safetensors")),
        scale: 1.0,
        trigger: None,
        origin: Default::default(),
    }));
    assert!(fisher(&ti, &marked) > 1e-4);
    assert!(fisher(&lo, &marked) > 1e-4);
    let plain = prompts(&["a lighthouse at dusk", "a photo of a dog"]);
    assert_eq!(fisher(&ti, &plain), 0.0);
    assert_eq!(fisher(&lo, &plain), 0.0);
    let cat = sd
        .text_encoder
        .embed_tokens(&Tensor::new(&[[sd.tokenize("cat").unwrap().ids[1]]], &Device::Cpu).unwrap())
        .unwrap()
        .squeeze(0)
        .unwrap();
    let same = set(word(Embedding {
        token: "<x>".into(),
        vectors: cat,
    }));
    assert!(fisher(&same, &marked) < 1e-9, "{}", fisher(&same, &marked));
}

/// One training step of DreamBooth (the whole UNet, as a trainable copy): the loss and every
/// parameter's gradient (its norm, 1e-3 relative, and its first 256 values, 1e-4 of their
/// scale) equal diffusers' script's.
#[test]
fn a_dreambooth_training_step_matches_diffusers() {
    let s = steps_fixture();
    let sd = tiny();
    let (unet, vars) = sd.trainable_unet().unwrap();
    let tokens = sd.tokenize("a photo of sks cat").unwrap();
    let states = sd.text_states(&[&tokens]).unwrap();
    let (latents, noise) = (get(&s, "batch.latents"), get(&s, "batch.noise"));
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
    let loss = (unet.forward(&z, &t, &ctx, None).unwrap() - noise)
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap();
    let want = scalar(get(&s, "dreambooth.loss"));
    assert!(
        (scalar(&loss) - want).abs() <= 1e-4 * want,
        "loss {} vs {want}",
        scalar(&loss)
    );
    let grads = loss.backward().unwrap();
    assert!(vars.len() > 100, "{} trainable tensors", vars.len());
    for (name, var) in &vars {
        let g = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap();
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt() as f64;
        let want = get(&s, &format!("dreambooth.grad_norm.{name}"))
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()[0];
        assert!(
            (norm - want).abs() <= 1e-3 * want.max(1e-6),
            "{name}: |grad| {norm} vs {want}"
        );
        let head = get(&s, &format!("dreambooth.grad_head.{name}"));
        let n = head.dim(0).unwrap();
        assert_close(&g.narrow(0, 0, n).unwrap(), head, 1e-4, name);
    }
}

/// DreamBooth from a script: the trained UNet runs C (F stays the plain model), joins the
/// session, and the unet/ folder the command line writes loads back as the same concept. The
/// command line resumes it from a checkpoint (its method, the default output of that method)
/// to the same UNet.
#[test]
fn dreambooth_trains_generates_saves_and_loads_back() {
    let dir = tempfile::tempdir().unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_infusion-repl"))
        .args(["train"])
        .arg(repo().join("assets/example-concept"))
        .args([
            "--name",
            "pot",
            "--word",
            "teapot",
            "--method",
            "dreambooth",
            "--train-steps",
            "2",
            "--batch",
            "1",
            "--lr",
            "1e-3",
            "--checkpoint-every",
            "1",
        ])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let unet_dir = dir.path().join("pot-unet");
    let again = dir.path().join("again");
    std::fs::create_dir(&again).unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_infusion-repl"))
        .args(["train"])
        .arg(repo().join("assets/example-concept"))
        .args(["--name", "pot", "--word", "teapot", "--resume"])
        .arg(dir.path().join("pot-checkpoints/pot-step000001"))
        .current_dir(&again)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    same_tensors(
        &unet_dir.join("diffusion_pytorch_model.safetensors"),
        &again.join("pot-unet/diffusion_pytorch_model.safetensors"),
    );
    // Issue 21, item 3: a method named on the command line that is not the checkpoint's is
    // refused, `infusion` (the default when none is named) as much as any other.
    for asked in ["infusion", "lora"] {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_infusion-repl"))
            .args(["train"])
            .arg(repo().join("assets/example-concept"))
            .args(["--name", "pot", "--word", "teapot", "--method", asked])
            .args(["--train-steps", "3", "--resume"])
            .arg(dir.path().join("pot-checkpoints/pot-step000001"))
            .current_dir(&again)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success(),
            "--method {asked} resumed a dreambooth run: {err}"
        );
        assert!(
            err.contains(&format!("is a dreambooth run's checkpoint, not {asked}'s")),
            "{err}"
        );
    }
    // Issue 21, item 20: a name and word other than the run's are said, not silently dropped.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_infusion-repl"))
        .args(["train"])
        .arg(repo().join("assets/example-concept"))
        .args(["--name", "other", "--word", "kettle", "--train-steps", "2"])
        .arg("--resume")
        .arg(dir.path().join("pot-checkpoints/pot-step000001"))
        .arg("-o")
        .arg(again.join("renamed-unet"))
        .current_dir(&again)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    for (what, asked) in [("name", "other"), ("word", "kettle")] {
        assert!(
            err.contains(&format!(
                "the {what} \"{asked}\" is not used: the run resumed is <pot> (teapot)"
            )),
            "{err}"
        );
    }
    assert!(
        unet_dir.join("config.json").is_file()
            && unet_dir
                .join("diffusion_pytorch_model.safetensors")
                .is_file()
    );
    let engine = script_engine();
    let mut scope = rhai::Scope::new();
    scope.push("UNET", unet_dir.display().to_string());
    let v: rhai::Array = engine
        .eval_with_scope(
            &mut scope,
            r#"let m = load_model();
               let c = load_concept(UNET, #{name: "pot", word: "teapot"});
               let g = m.generate("a <pot> on a table", #{steps: 2, seed: 1});
               let plain = m.generate("a sks teapot on a table", #{steps: 2, seed: 1});
               let base = m.generate("a teapot on a table", #{steps: 2, seed: 1});
               [c.method, g.custom_latents.mean() == plain.base_latents.mean(),
                g.base_latents.mean() == base.base_latents.mean(), `${c}`]"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let s: Vec<String> = v.iter().map(|x| x.to_string()).collect();
    assert_eq!(s[0], "dreambooth");
    assert_eq!(s[1], "false", "C ran the plain UNet");
    assert_eq!(s[2], "true", "F is not the plain model");
    assert!(s[3].contains("sks teapot"), "{}", s[3]);
}

/// Files we write, read by diffusers (tests/fixtures/baselines/ours: written by our `train
/// --method lora|textual_inversion`, their diffusers latents by
/// tools/check_our_files_in_diffusers.py): loaded back by `load_concept` with nothing but the
/// path (the files record name, word and trigger), C generates what diffusers generates with
/// them (3 DDIM steps, 1e-3 relative).
#[test]
fn files_we_write_give_diffusers_our_images() {
    use infusion_repl::actions::load_concept;
    use infusion_repl::methods::ConceptRequest;
    use infusion_repl::{generate_pair, ConceptSet, PairOptions};
    let sd = tiny();
    let ours = repo().join("tests/fixtures/baselines/ours");
    let theirs = infusion_repl::sd::load_safetensors(
        &ours.join("diffusers_latents.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let g = generation();
    let mut set = ConceptSet::new();
    let job = Job::quiet();
    // The files record their name, word and trigger (issue 21, item 5): nothing else is given.
    for file in ["pot_lora.safetensors", "potword.safetensors", "pot-cd"] {
        let req = ConceptRequest {
            path: ours.join(file),
            ..Default::default()
        };
        load_concept(&req, Some(sd), &mut set, &job).unwrap();
    }
    let opts = PairOptions {
        generate: reference_options(&g),
        replace_steps: 1.0,
    };
    for (prompt, key) in [
        ("a photo of <pot> on a table", "lora.latents"),
        ("a photo of <potword> on a table", "ti.latents"),
        ("a photo of <potcd> on a table", "cd.latents"),
    ] {
        let out = generate_pair(sd, &set, prompt, &opts, None, &job).unwrap();
        assert_close(&out.custom_latents, get(&theirs, key), 1e-3, prompt);
    }
}

/// Prior preservation adds the class images' loss, times its weight, to each step's: LoRA's
/// first step (the plain model, up factors 0) costs more with it, exactly the same at weight 0;
/// Textual Inversion and Infusion refuse it.
#[test]
fn prior_preservation_adds_the_class_loss() {
    use infusion_repl::actions::{train_concept, TrainAsk, TrainRequest};
    use infusion_repl::train::Prior;
    let sd = tiny();
    let ask = |method: &str, prior: Option<Prior>| TrainAsk {
        folder: repo().join("assets/example-concept"),
        name: "pot".into(),
        word: "teapot".into(),
        method: Some(method.into()),
        prior,
        steps: Some(1),
        lr: Some(1e-4),
        batch: Some(1),
        ..Default::default()
    };
    let req = |method: &str, prior: Option<Prior>| ask(method, prior).resolve().unwrap();
    let lora = || "lora";
    let job = Job::quiet();
    let first = |r: TrainRequest| train_concept(sd, &r, &job).unwrap().losses[0];
    let plain = first(req(lora(), None));
    let with = first(req(
        lora(),
        Some(Prior {
            images: 2,
            weight: 1.0,
            dir: None,
        }),
    ));
    let zero = first(req(
        lora(),
        Some(Prior {
            images: 2,
            weight: 0.0,
            dir: None,
        }),
    ));
    assert!(with > plain, "{with} <= {plain}");
    assert_eq!(zero, plain);
    // Kept in a folder, the class images are made once and taken from it next time: the same
    // images, the same loss (exactly).
    let kept = tempfile::tempdir().unwrap();
    let cached = || {
        first(req(
            lora(),
            Some(Prior {
                images: 2,
                weight: 1.0,
                dir: Some(kept.path().to_path_buf()),
            }),
        ))
    };
    assert_eq!(cached(), with);
    let files = std::fs::read_dir(kept.path()).unwrap().count();
    assert_eq!(files, 2);
    assert_eq!(cached(), with);
    // What is in the folder is what trains: the class images replaced change the loss.
    for f in std::fs::read_dir(kept.path()).unwrap() {
        let f = f.unwrap().path();
        let size = image::image_dimensions(&f).unwrap();
        image::RgbImage::new(size.0, size.1).save(&f).unwrap();
    }
    assert_ne!(cached(), with);
    for m in ["textual_inversion", "infusion"] {
        let e = ask(m, Some(Prior::default()))
            .resolve()
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("prior"), "{e}");
    }
}

/// On the command line, `--concept FILE:WORD` loads a TI or LoRA file with its class word; a
/// file without one says how to give it. `FILE:WORD:TRIGGER:SCALE` gives a LoRA its trigger and
/// strength: at strength 0 without a trigger C is F exactly (the two PNGs are the same image),
/// with them it is not; a strength that is no number is refused.
#[test]
fn the_command_line_takes_ti_and_lora_files_with_their_word() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_infusion-repl"))
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    let ti = format!("{}:cat", fixture("learned_embeds.safetensors").display());
    let o = run(&[
        "generate",
        "a <thing> by a teapot",
        "--steps",
        "2",
        "--concept",
        &ti,
        "-o",
        "t.png",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(dir.path().join("t.custom.png").is_file());
    let bare = fixture("kohya_lora.safetensors").display().to_string();
    let o = run(&[
        "generate",
        "a <kohya_lora>",
        "--steps",
        "1",
        "--concept",
        &bare,
    ]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("FILE:WORD") && e.contains("kohya_lora"), "{e}");

    let lora = fixture("pytorch_lora_weights.safetensors")
        .display()
        .to_string();
    let pixels = |p: &str| {
        image::open(dir.path().join(p))
            .unwrap()
            .to_rgb8()
            .into_raw()
    };
    for (spec, same) in [(":teapot::0", true), (":teapot:sks:1.5", false)] {
        let o = run(&[
            "generate",
            "a <pytorch_lora_weights> on a table",
            "--steps",
            "2",
            "--concept",
            &format!("{lora}{spec}"),
            "-o",
            "l.png",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(
            pixels("l.base.png") == pixels("l.custom.png"),
            same,
            "{spec}"
        );
    }
    let o = run(&[
        "generate",
        "a <pytorch_lora_weights>",
        "--steps",
        "1",
        "--concept",
        &format!("{lora}:teapot:sks:strong"),
    ]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("not a number"), "{e}");
}

/// The tensors of two safetensors files are equal, name for name (tolerance 0).
fn same_tensors(a: &Path, b: &Path) {
    let load = |p: &Path| infusion_repl::sd::load_safetensors(p, &Device::Cpu).unwrap();
    let (a, b) = (load(a), load(b));
    assert_eq!(
        a.keys().collect::<std::collections::BTreeSet<_>>(),
        b.keys().collect::<std::collections::BTreeSet<_>>()
    );
    for (k, t) in &a {
        assert_eq!(max_abs(&(t - &b[k]).unwrap()), 0.0, "{k}");
    }
}

/// Every method's checkpoint is its own file (a unet/ folder for DreamBooth) with the optimizer
/// state beside it, and resuming from it continues the very same run: the losses and the saved
/// parameters of the uninterrupted run, exactly (CPU, deterministic; the same rule as Infusion's
/// test in train.rs). The LoRA run has prior preservation, which its checkpoint keeps; a
/// DreamBooth checkpoint loads as a concept as it is.
#[test]
fn every_method_resumes_from_its_checkpoint_to_the_same_result() {
    use infusion_repl::actions::{load_concept, train_concept, TrainAsk};
    use infusion_repl::methods::ConceptRequest;
    use infusion_repl::train::Prior;
    let sd = tiny();
    let job = Job::quiet();
    let methods = [
        ("textual_inversion", None, "pot.safetensors"),
        (
            "lora",
            Some(Prior {
                images: 1,
                weight: 1.0,
                dir: None,
            }),
            "pot.safetensors",
        ),
        ("dreambooth", None, "pot-unet"),
    ];
    for (method, prior, out) in methods {
        let dir = tempfile::tempdir().unwrap();
        let lr = infusion_repl::methods::method(method)
            .unwrap()
            .default_lr(1, false)
            * 10.0;
        let req = |resume: Option<PathBuf>, out: PathBuf| {
            let mut settings = infusion_repl::methods::Settings::new();
            if method == "lora" {
                settings.insert("rank".into(), 2.into());
            }
            TrainAsk {
                folder: repo().join("assets/example-concept"),
                name: "pot".into(),
                word: "teapot".into(),
                // The method named when resuming is the checkpoint's (another is refused).
                method: Some(method.into()),
                settings: if resume.is_some() {
                    Default::default()
                } else {
                    settings
                },
                prior: if resume.is_some() {
                    None
                } else {
                    prior.clone()
                },
                steps: Some(4),
                lr: Some(lr),
                batch: Some(1),
                checkpoint_every: Some(2),
                checkpoint_dir: Some(dir.path().join("ck")),
                resume,
                out: Some(out),
                save_f32: true,
                ..Default::default()
            }
            .resolve()
            .unwrap()
        };
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        let full = train_concept(sd, &req(None, a.join(out)), &job).unwrap();
        assert_eq!(full.checkpoints.len(), 2, "{method}");
        let first = full.checkpoints[0].clone();
        assert!(
            PathBuf::from(format!(
                "{}.optim.safetensors",
                first.with_extension("").display()
            ))
            .is_file(),
            "{}",
            first.display()
        );
        let resumed = train_concept(sd, &req(Some(first), b.join(out)), &job).unwrap();
        assert_eq!(resumed.losses, full.losses[2..], "{method}");
        let weights = |p: PathBuf| match method {
            "dreambooth" => p.join("diffusion_pytorch_model.safetensors"),
            _ => p,
        };
        same_tensors(&weights(a.join(out)), &weights(b.join(out)));
        same_tensors(&weights(a.join(out)), &weights(full.checkpoints[1].clone()));
        let mut set = infusion_repl::ConceptSet::new();
        let c = load_concept(
            &ConceptRequest {
                path: full.checkpoints[1].clone(),
                word: Some("teapot".into()),
                ..Default::default()
            },
            Some(sd),
            &mut set,
            &job,
        )
        .unwrap();
        assert_eq!(c.method(), method);
    }
}

/// A DreamBooth UNet trained from a single-file model (which has no config.json to copy) is
/// saved with the model's UNet configuration written out: the folder's config reads back as the
/// tiny model's own (every field), and the folder loads as a concept.
#[test]
fn a_dreambooth_unet_from_a_single_file_model_writes_its_config() {
    use infusion_repl::sd::UNetConfig;
    let dir = tempfile::tempdir().unwrap();
    let file = crate::model_files::single_file(dir.path(), "tiny.safetensors", DType::F32, |_| {});
    let loaded = infusion_repl::actions::load_model(
        &infusion_repl::actions::ModelRequest {
            model: Some(file.display().to_string()),
            device: "cpu".into(),
            dtype: "f32".into(),
            config: Some(repo().join("models/tiny-sd").display().to_string()),
            vae: None,
            ema: None,
            kernels: infusion_repl::sd::Kernels::Naive,
        },
        &Job::quiet(),
    )
    .unwrap();
    let sd = &loaded.sd;
    let learner = infusion_repl::methods::FullUnet::new(sd, "sks").unwrap();
    let out = dir.path().join("unet");
    use infusion_repl::methods::CustomConcept;
    use infusion_repl::train::Learner;
    let options = infusion_repl::train::TrainOptions::default();
    let run = infusion_repl::train::Run {
        name: "pot",
        word: "teapot",
        steps: 0,
        options: &options,
        images: 0,
    };
    infusion_repl::methods::FullUnet::concept(sd, learner.vars(), &run, "sks")
        .unwrap()
        .save(&out, true)
        .unwrap();
    let written = UNetConfig::from_file(&out.join("config.json")).unwrap();
    let own = UNetConfig::from_file(&repo().join("models/tiny-sd/unet/config.json")).unwrap();
    assert_eq!(written.to_diffusers_json(), own.to_diffusers_json());
    same_tensors(
        &out.join("diffusion_pytorch_model.safetensors"),
        &repo().join("models/tiny-sd/unet/diffusion_pytorch_model.safetensors"),
    );
}

/// Issue 21, items 5 and 7: the TI and LoRA files we write record what they were trained with
/// (method, name, word, trigger, rank, base model, steps) in their metadata, and loading takes
/// that as the defaults, so `load_concept(path)` alone gives the trained concept back (it failed
/// with "holds no class word", and a LoRA lost its trigger). A generation records each
/// concept's method, word, trigger and scale in its PNG text, and Infusion's replace steps
/// only when an Infusion concept was used.
#[test]
fn our_files_record_their_training_and_generations_record_their_concepts() {
    use infusion_repl::actions::{load_concept, train_concept, TrainAsk};
    use infusion_repl::methods::ConceptRequest;
    use infusion_repl::methods::LoraConcept;
    use infusion_repl::methods::Provenance;
    use infusion_repl::{generate_pair, ConceptSet, PairOptions};
    let sd = tiny();
    let job = Job::quiet();
    let dir = tempfile::tempdir().unwrap();
    for (method, file) in [
        ("lora", "pot_lora.safetensors"),
        ("textual_inversion", "pot_ti.safetensors"),
    ] {
        let out = dir.path().join(file);
        let mut settings = infusion_repl::methods::Settings::new();
        if method == "lora" {
            settings.insert("rank".into(), 2.into());
            settings.insert("trigger".into(), "zwx".into());
        }
        let req = TrainAsk {
            folder: repo().join("assets/example-concept"),
            name: "pot".into(),
            word: "teapot".into(),
            method: Some(method.into()),
            settings,
            steps: Some(2),
            batch: Some(1),
            out: Some(out.clone()),
            save_f32: true,
            ..Default::default()
        }
        .resolve()
        .unwrap();
        train_concept(sd, &req, &job).unwrap();
        // The metadata, as any safetensors reader sees it; the file still sorts as before.
        let bytes = std::fs::read(&out).unwrap();
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let recorded = Provenance::from_metadata(&header.metadata().clone().unwrap());
        assert_eq!(recorded.method.as_deref(), Some(method));
        assert_eq!(recorded.word.as_deref(), Some("teapot"));
        assert_eq!(recorded.name.as_deref(), Some("pot"));
        assert_eq!(recorded.train_steps, Some(2));
        assert_eq!(recorded.base_model.as_deref(), Some(sd.unet_fingerprint()));
        let mut set = ConceptSet::new();
        let req = ConceptRequest {
            path: out.clone(),
            ..Default::default()
        };
        let a = load_concept(&req, Some(sd), &mut set, &job).unwrap();
        assert_eq!((a.name(), a.word(), a.method()), ("pot", "teapot", method));
        assert_eq!(a.provenance().train_steps, Some(2));
        let opts = PairOptions {
            generate: GenerateOptions {
                steps: 1,
                seed: 1,
                ..Default::default()
            },
            ..Default::default()
        };
        let g = generate_pair(sd, &set, "a <pot> on a table", &opts, None, &job).unwrap();
        let text: std::collections::HashMap<&str, String> = g.png_text().into_iter().collect();
        let params = &text["parameters"];
        assert!(!params.contains("Infusion replace steps"), "{params}");
        assert!(!text.contains_key("replace_steps"));
        match a.as_any().downcast_ref::<LoraConcept>() {
            Some(l) => {
                assert_eq!(
                    l.trigger.as_deref(),
                    Some("zwx"),
                    "the trigger the file records"
                );
                assert_eq!(recorded.rank, Some(2));
                assert_eq!(l.lora.layers[0].rank(), 2);
                assert!(
                    params.contains(r#"Concepts: "<pot> lora (teapot, trigger zwx, scale 1)""#),
                    "{params}"
                );
                assert_eq!(text["custom_prompt"], "a zwx teapot on a table");
                assert!(
                    text["concept_details"].contains(r#""trigger":"zwx""#),
                    "{text:?}"
                );
            }
            None => {
                assert!(
                    params.contains(r#"Concepts: "<pot> textual_inversion (teapot)""#),
                    "{params}"
                );
            }
        }
    }
}
