//! Issue 21, items 14 and 20: sizes that aborted or hung are one clear error before any work,
//! and files and configs that were accepted silently and wrong are refused with what is wrong.

use std::path::Path;
use std::process::Output;

use candle_core::{DType, Device, Tensor};
use infusion_repl::{LoadOptions, StableDiffusion};

use crate::common::{copy_dir, repo, tiny, tiny_model_dir};

fn run(args: &[&str], cwd: &Path) -> Output {
    crate::common::run_bin(args, cwd)
}

fn stderr(o: &Output) -> String {
    crate::common::stderr_of(o)
}

/// Runs `script` as a recipe; returns (exit code, stdout, stderr).
fn recipe(dir: &Path, script: &str, extra: &[&str]) -> (Option<i32>, String, String) {
    std::fs::write(dir.join("r.rhai"), script).unwrap();
    let mut args = vec!["--no-images"];
    args.extend(extra);
    args.push("r.rhai");
    let o = run(&args, dir);
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr(&o),
    )
}

/// The script engine's limits turn runaway data into an error (the process aborted on
/// `blob(1e11)` and on a string doubled in a loop), data nested thousands deep prints, compares
/// and drops (on the binary's large stack), and `--script-limits` raises them.
#[test]
fn script_data_is_bounded_and_deep_data_survives() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (code, _, err) = recipe(d, "let b = blob(100000000000); print(b.len());", &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("Size of array/BLOB too large"), "{err}");
    let (code, _, err) = recipe(d, "let s = \"x\"; loop { s += s; }", &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("Length of string too large"), "{err}");
    let (code, _, err) = recipe(d, "let a = [0]; loop { a += a; }", &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("Size of array/BLOB too large"), "{err}");
    // 3000 levels deep: built, printed, compared, dropped.
    let deep = "let a = []; for i in 0..3000 { a = [a]; } let m = #{}; \
                for i in 0..3000 { m = #{x: m}; } \
                print(`${a}`.len()); print(`${m}`.len()); print(a == a); a = (); m = (); \
                print(\"dropped\");";
    let (code, out, err) = recipe(d, deep, &[]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["6002", "24003", "true", "dropped"]
    );
    // Twice the limits: a string of 200 MiB fits, one of 300 MiB does not.
    let grow = |mib: usize| {
        format!("let s = \"x\"; while s.len() < {mib} * 1048576 {{ s += s; }} print(\"grown\");")
    };
    let (code, _, err) = recipe(d, &grow(129), &[]);
    assert_eq!(code, Some(1), "{err}");
    let (code, out, err) = recipe(d, &grow(129), &["--script-limits", "2"]);
    assert_eq!((code, out.trim()), (Some(0), "grown"), "{err}");
}

/// Sizes asked of images, LoRAs, generations and the toy are checked before any allocation.
#[test]
fn absurd_sizes_are_one_error_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let script = r#"
        let img = load_image(ARGS[0]);
        let out = [];
        for f in [|| img.resize(1000000000, 1), || grid([img, img], 2, #{gap: 9223372036854775807}),
                     || grid([img, img], 2, #{gap: 40000})] {
            try { f.call(); out.push("made"); } catch (e) { out.push(`${e}`); }
        }
        for o in out { print(o); }
    "#;
    let image = repo().join("assets/example-concept");
    let first = std::fs::read_dir(&image)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::write(d.join("r.rhai"), script).unwrap();
    let o = run(&["--no-images", "r.rhai", first.to_str().unwrap()], d);
    let out = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out} {}", stderr(&o));
    for l in &lines {
        assert!(l.contains("each side is 1 to 32768"), "{l}");
    }
    let o = run(&["generate", "x", "-n", "1000000000"], d);
    assert!(stderr(&o).contains("at most 100000"), "{}", stderr(&o));
    let o = run(
        &[
            "train",
            repo().join("assets/example-concept").to_str().unwrap(),
            "--name",
            "p",
            "--word",
            "pot",
            "--method",
            "lora",
            "--rank",
            "100000",
        ],
        d,
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("a LoRA's rank is at most"),
        "{}",
        stderr(&o)
    );
    let o = run(&["bench", "--steps", "0"], d);
    assert!(
        stderr(&o).contains("`--steps`: must be at least 1"),
        "{}",
        stderr(&o)
    );
    assert!(!d.join("image.png").exists() && !d.join("p.safetensors").exists());
}

/// A copy of the tiny model with `file`'s JSON changed by `edit`; the load's error.
fn load_error(file: &str, edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    copy_dir(&tiny_model_dir(), &model);
    let path = model.join(file);
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut json);
    std::fs::write(&path, json.to_string()).unwrap();
    match StableDiffusion::load_dir(&model, &LoadOptions::default()) {
        Ok(_) => panic!("{file}: a config with {json} loaded"),
        Err(e) => e.to_string(),
    }
}

/// Configs that loaded and then hung (huge timesteps or layer counts) or were silently wrong
/// (no text layers, a steps offset past the schedule, no merges) are refused naming the key.
#[test]
fn configs_past_any_sd1_model_are_refused() {
    let e = load_error("scheduler/scheduler_config.json", |j| {
        j["num_train_timesteps"] = 1_000_000_000.into()
    });
    assert!(e.contains("num_train_timesteps is 1000000000"), "{e}");
    let e = load_error("scheduler/scheduler_config.json", |j| {
        j["steps_offset"] = 5000.into()
    });
    assert!(e.contains("steps_offset 5000"), "{e}");
    let e = load_error("text_encoder/config.json", |j| {
        j["num_hidden_layers"] = 0.into()
    });
    assert!(e.contains("num_hidden_layers is 0"), "{e}");
    let e = load_error("text_encoder/config.json", |j| {
        j["num_hidden_layers"] = 100_000.into()
    });
    assert!(e.contains("num_hidden_layers is 100000"), "{e}");
    let e = load_error("unet/config.json", |j| {
        j["layers_per_block"] = 1_000_000.into()
    });
    assert!(e.contains("layers_per_block is 1000000"), "{e}");
    let e = load_error("vae/config.json", |j| {
        j["layers_per_block"] = 1_000_000.into()
    });
    assert!(e.contains("layers_per_block is 1000000"), "{e}");
    // merges.txt with its header only.
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    copy_dir(&tiny_model_dir(), &model);
    std::fs::write(model.join("tokenizer/merges.txt"), "#version: 0.2\n").unwrap();
    let e = StableDiffusion::load_dir(&model, &LoadOptions::default())
        .err()
        .expect("a tokenizer without merges loaded")
        .to_string();
    assert!(e.contains("holds no merges"), "{e}");
}

fn save(path: &Path, tensors: Vec<(String, Tensor)>) {
    candle_core::safetensors::save(&tensors.into_iter().collect(), path).unwrap();
}

/// Concept files that were read wrong without a word: embeddings of 0 or 100 vectors, integer
/// tensors, LyCORIS parts and stray keys beside a LoRA.
#[test]
fn concept_files_that_cannot_be_right_are_refused() {
    use infusion_repl::actions::load_concept;
    use infusion_repl::methods::ConceptRequest;
    let dir = tempfile::tempdir().unwrap();
    let sd = tiny();
    let width = sd.text_encoder.hidden_size();
    let load = |file: &str| -> String {
        let req = ConceptRequest {
            path: dir.path().join(file),
            word: Some("cat".into()),
            ..Default::default()
        };
        let mut set = infusion_repl::ConceptSet::new();
        match load_concept(&req, Some(sd), &mut set, &infusion_repl::Job::quiet()) {
            Ok(_) => panic!("{file} loaded"),
            Err(e) => e.to_string(),
        }
    };
    let cpu = Device::Cpu;
    save(
        &dir.path().join("none.safetensors"),
        vec![(
            "<x>".into(),
            Tensor::zeros((0, width), DType::F32, &cpu).unwrap(),
        )],
    );
    assert!(load("none.safetensors").contains("at least one vector"));
    save(
        &dir.path().join("many.safetensors"),
        vec![(
            "<x>".into(),
            Tensor::zeros((100, width), DType::F32, &cpu).unwrap(),
        )],
    );
    let e = load("many.safetensors");
    assert!(
        e.contains("holds 100 vectors") && e.contains("1 to 75"),
        "{e}"
    );
    save(
        &dir.path().join("ints.safetensors"),
        vec![(
            "<x>".into(),
            Tensor::zeros((1, width), DType::U32, &cpu).unwrap(),
        )],
    );
    assert!(
        load("ints.safetensors").contains("integers"),
        "{}",
        load("ints.safetensors")
    );
    let stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
    let factor = |r: usize, c: usize| Tensor::zeros((r, c), DType::F32, &cpu).unwrap();
    let lora = |extra: Vec<(String, Tensor)>, down: Tensor| -> Vec<(String, Tensor)> {
        let mut t = vec![
            (format!("{stem}.lora_down.weight"), down),
            (format!("{stem}.lora_up.weight"), factor(32, 4)),
        ];
        t.extend(extra);
        t
    };
    save(
        &dir.path().join("lycoris.safetensors"),
        lora(
            vec![(format!("{stem}.hada_w1_a"), factor(32, 4))],
            factor(4, 32),
        ),
    );
    let e = load("lycoris.safetensors");
    assert!(e.contains("LyCORIS"), "{e}");
    save(
        &dir.path().join("stray.safetensors"),
        lora(
            vec![(
                "conditioner.embedders.1.model.ln_final.weight".into(),
                factor(1, 4),
            )],
            factor(4, 32),
        ),
    );
    let e = load("stray.safetensors");
    assert!(
        e.contains("not LoRA factors or alphas") && e.contains("conditioner"),
        "{e}"
    );
    let ints = Tensor::zeros((4, 32), DType::U32, &cpu).unwrap();
    save(&dir.path().join("int_lora.safetensors"), lora(vec![], ints));
    assert!(load("int_lora.safetensors").contains("integers"));
}
