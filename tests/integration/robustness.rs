//! Bad inputs and faults from the robustness sweep (issue 10), each reproduced on the bundled tiny
//! model: absurd numbers are refused before anything is allocated, non-finite numbers and NaN
//! weights are named, malformed concept files and model folders say what is wrong, and special
//! files never hang a run.

use crate::common::copy_dir;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use infusion_repl::app::{build_engine, ScriptConfig, Session};
use infusion_repl::{Concept, ConceptSet, Job, LoadOptions, StableDiffusion};

use crate::common::{tiny, tiny_model_dir};

fn run(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_infusion-repl"))
        .args(args)
        .current_dir(cwd)
        .env_remove("INFUSION_MODEL")
        .output()
        .expect("infusion-repl runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The error of a script, or a panic if it ran.
fn script_err(script: &str) -> String {
    let session = Session::new(ScriptConfig {
        progress: false,
        ..ScriptConfig::default()
    });
    match build_engine(&session).eval::<rhai::Dynamic>(script) {
        Ok(v) => panic!("{script} gave {v}"),
        Err(e) => e.to_string(),
    }
}

fn images(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..3u8 {
        image::RgbImage::from_fn(40, 40, |x, y| {
            image::Rgb([x as u8 * 5, y as u8 * 5, i * 80])
        })
        .save(dir.join(format!("{i}.png")))
        .unwrap();
    }
}

/// Sizes, batches and counts that cannot fit are refused with the limit, before any
/// allocation: the process exits 1 (not 134), and a script gets an error it can survive.
#[test]
fn absurd_sizes_are_refused_before_any_allocation() {
    let dir = tempfile::tempdir().unwrap();
    let o = run(
        &["generate", "x", "--width", "100000", "--steps", "1"],
        dir.path(),
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("`--width`") && e.contains("needs about") && e.contains("available"),
        "{e}"
    );
    images(&dir.path().join("imgs"));
    let o = run(
        &[
            "train",
            "imgs",
            "--name",
            "p",
            "--word",
            "pot",
            "--batch",
            "1000000000",
        ],
        dir.path(),
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("`--batch`"), "{}", stderr(&o));
    assert!(!dir.path().join("p.safetensors").exists());

    let e = script_err("let m = load_model(); m.generate(\"x\", #{width: 100000, height: 100000})");
    assert!(e.contains("needs about"), "{e}");
    let e = script_err(
        "let m = load_model(); let g = m.generate(\"x\", #{steps: 1}); g.base.resize(100000, 100000)",
    );
    assert!(e.contains("each side is 1 to 32768"), "{e}");
    let e = script_err(
        "let m = load_model(); fisher_divergence(m, m, [\"a\"], #{samples: 1000000000000})",
    );
    assert!(e.contains("`samples`") && e.contains("needs about"), "{e}");
}

/// NaN and infinity are refused where they come in, and NaN produced inside the model is named
/// by its stage instead of a black image with exit 0.
#[test]
fn non_finite_numbers_are_refused_and_nan_weights_named() {
    let dir = tempfile::tempdir().unwrap();
    let o = run(
        &["generate", "x", "--guidance", "nan", "--steps", "1"],
        dir.path(),
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("`--guidance`: NaN is not a finite number"),
        "{}",
        stderr(&o)
    );
    assert!(!dir.path().join("image.png").exists());
    let e = script_err("let m = load_model(); m.generate(\"x\", #{guidance: 0.0 / 0.0})");
    assert!(e.contains("option `guidance` must be number"), "{e}");

    let noise = dir.path().join("noise.safetensors");
    let n = (Tensor::ones((1, 4, 4, 4), DType::F32, &Device::Cpu).unwrap() * f64::NAN).unwrap();
    candle_core::safetensors::save(&std::collections::HashMap::from([("noise", n)]), &noise)
        .unwrap();
    let o = run(
        &[
            "generate",
            "x",
            "--noise",
            "noise.safetensors",
            "--steps",
            "1",
        ],
        dir.path(),
    );
    assert!(
        stderr(&o).contains("`--noise`") && stderr(&o).contains("NaN"),
        "{}",
        stderr(&o)
    );

    let model = dir.path().join("model");
    copy_dir(&tiny_model_dir(), &model);
    let file = model.join("unet/diffusion_pytorch_model.safetensors");
    let mut t = infusion_repl::sd::load_safetensors(&file, &Device::Cpu).unwrap();
    let bias = t["conv_out.bias"].clone();
    t.insert("conv_out.bias".into(), (bias * f64::NAN).unwrap());
    candle_core::safetensors::save(&t, &file).unwrap();
    let o = run(
        &["--model", "model", "generate", "x", "--steps", "2"],
        dir.path(),
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("NaN or infinite at denoising step 1 of 2"),
        "{}",
        stderr(&o)
    );
}

/// Step counts the scheduler or the trainer cannot honour are refused, not silently changed.
#[test]
fn step_counts_out_of_range_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let o = run(&["generate", "x", "--steps", "1000000000"], dir.path());
    assert!(
        stderr(&o).contains("`--steps`: 1000000000: the scheduler has 1000 timesteps"),
        "{}",
        stderr(&o)
    );
    images(&dir.path().join("imgs"));
    let train = |extra: &[&str]| {
        let mut a = vec!["train", "imgs", "--name", "p", "--word", "pot"];
        a.extend_from_slice(extra);
        run(&a, dir.path())
    };
    let o = train(&["--train-steps", "0"]);
    assert!(
        stderr(&o).contains("`--train-steps`: must be at least 1"),
        "{}",
        stderr(&o)
    );
    assert!(!dir.path().join("p.safetensors").exists());
    let o = train(&["--train-steps", "2", "--checkpoint-every", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = train(&[
        "--train-steps",
        "2",
        "--resume",
        "p-checkpoints/p-step000002.safetensors",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("is at step 2: nothing to train up to 2"),
        "{}",
        stderr(&o)
    );
}

fn concept_bytes(edit: impl FnOnce(&mut Concept)) -> Concept {
    let sd = tiny();
    let mut c = Concept::zeros("pot", "teapot", sd.unet.attention_layers(), None).unwrap();
    edit(&mut c);
    c
}

/// A concept file says what is wrong with it: tensors of another type, an empty class word,
/// metadata (not "not a valid safetensors file", which is for unreadable files); loading a
/// second concept of the same name warns.
#[test]
fn concept_files_say_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let load = |name: &str| {
        let mut set = ConceptSet::new();
        set.load_file(&dir.path().join(name), Some(tiny()), false, &Job::quiet())
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    // Tensors as i64 and f64, written with the concept's own metadata.
    let c = concept_bytes(|_| {});
    for (dtype, file) in [
        (DType::I64, "i64.safetensors"),
        (DType::F64, "f64.safetensors"),
    ] {
        let bytes = c.to_bytes(DType::F32).unwrap();
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let meta = header.metadata().clone();
        let tensors: Vec<(String, Tensor)> = c
            .deltas
            .iter()
            .map(|(k, t)| (k.clone(), t.to_dtype(dtype).unwrap()))
            .collect();
        std::fs::write(
            dir.path().join(file),
            safetensors::serialize(tensors, meta).unwrap(),
        )
        .unwrap();
        let e = load(file);
        assert!(
            e.contains("concept residuals are f16 or f32")
                && !e.contains("not a valid safetensors"),
            "{e}"
        );
    }
    let mut empty = concept_bytes(|_| {});
    empty.word = " ".into();
    let bytes = empty.to_bytes(DType::F16).unwrap();
    std::fs::write(dir.path().join("empty.safetensors"), bytes).unwrap();
    let e = load("empty.safetensors");
    assert!(e.contains("class word (metadata `word`) is empty"), "{e}");

    concept_bytes(|_| {})
        .save(&dir.path().join("a.safetensors"), DType::F16)
        .unwrap();
    let mut other = concept_bytes(|_| {});
    other.word = "kettle".into();
    other
        .save(&dir.path().join("b.safetensors"), DType::F16)
        .unwrap();
    let job = Job::collecting();
    let mut set = ConceptSet::new();
    set.load_file(&dir.path().join("a.safetensors"), Some(tiny()), false, &job)
        .unwrap();
    set.load_file(&dir.path().join("b.safetensors"), Some(tiny()), false, &job)
        .unwrap();
    assert!(
        job.messages()
            .iter()
            .any(|m| m.contains("<pot> (kettle) replaces") && m.contains("(teapot)")),
        "{:?}",
        job.messages()
    );
}

/// `model_index.json` is read: a folder without it, with bad JSON, or of another pipeline
/// class is refused with one line.
#[test]
fn model_index_is_read_and_other_pipelines_refused() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&tiny_model_dir(), dir.path());
    let index = dir.path().join("model_index.json");
    let load = || {
        StableDiffusion::load_dir(dir.path(), &LoadOptions::default())
            .err()
            .expect("refused")
            .to_string()
    };
    let text = std::fs::read_to_string(&index).unwrap();
    std::fs::write(
        &index,
        text.replace("StableDiffusionPipeline", "StableDiffusionXLPipeline"),
    )
    .unwrap();
    let e = load();
    assert!(
        e.contains("is a StableDiffusionXLPipeline folder") && !e.contains('\n'),
        "{e}"
    );
    std::fs::write(&index, "{ not json").unwrap();
    assert!(load().contains("model_index.json"), "{}", load());
    std::fs::remove_file(&index).unwrap();
    assert!(load().contains("has no model_index.json"), "{}", load());
}

/// A FIFO given as a concept file is refused at once: opening it would wait for a writer.
#[cfg(unix)]
#[test]
fn a_fifo_concept_is_refused_not_waited_on() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("c.safetensors");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let mut child = Command::new(env!("CARGO_BIN_EXE_infusion-repl"))
        .args([
            "generate",
            "a <c>",
            "--steps",
            "1",
            "--concept",
            "c.safetensors",
        ])
        .current_dir(dir.path())
        .env_remove("INFUSION_MODEL")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(60) {
            child.kill().unwrap();
            panic!("infusion-repl waited on the FIFO");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("not a regular file"), "{}", stderr(&o));
}

/// Each message names the real culprit.
#[test]
fn messages_blame_the_real_culprit() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&tiny_model_dir(), dir.path());
    let cfg = dir.path().join("unet/config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    v["sample_size"] = serde_json::json!(0);
    std::fs::write(&cfg, v.to_string()).unwrap();
    let e = StableDiffusion::load_dir(dir.path(), &LoadOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("unet/config.json") && e.contains("sample_size is 0"),
        "{e}"
    );

    let imgs = tempfile::tempdir().unwrap();
    images(imgs.path());
    let o = run(
        &[
            "train",
            imgs.path().to_str().unwrap(),
            "--name",
            "p",
            "--word",
            "",
        ],
        dir.path(),
    );
    assert!(
        stderr(&o).contains("`--word`: the class word is empty"),
        "{}",
        stderr(&o)
    );

    let o = run(&["generate", "x", "--seed", "-2"], dir.path());
    assert!(stderr(&o).contains("`-2` is not a seed"), "{}", stderr(&o));
    assert!(!stderr(&o).contains("-- -2"), "{}", stderr(&o));
    let o = run(
        &[
            "train", "imgs", "--name", "p", "--word", "pot", "--seed", "-1",
        ],
        dir.path(),
    );
    assert!(stderr(&o).contains("`-1` is not a seed"), "{}", stderr(&o));

    let e = script_err(
        "let m = load_model(); let g = m.generate(\"x\", #{steps: 1}); dino_i(load_dino(), [g.base], [])",
    );
    assert!(e.contains("`references`"), "{e}");

    // A tensor whose size disagrees with its offsets is named, not the one after it.
    let c = concept_bytes(|_| {});
    let bytes = c.to_bytes(DType::F32).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let first = c.deltas.keys().next().unwrap().clone();
    let shape = header[&first]["shape"][0].as_u64().unwrap();
    header[&first]["shape"] = serde_json::json!([shape + 1]);
    let mut h = serde_json::to_vec(&header).unwrap();
    h.resize(h.len().div_ceil(8) * 8, b' ');
    let mut broken = (h.len() as u64).to_le_bytes().to_vec();
    broken.extend_from_slice(&h);
    broken.extend_from_slice(&bytes[8 + n..]);
    let path = dir.path().join("broken.safetensors");
    std::fs::write(&path, broken).unwrap();
    let e = Concept::load(&path).unwrap_err().to_string();
    assert!(
        e.contains(&format!("tensor `{first}`")) && e.contains("takes"),
        "{e}"
    );
}

/// Where the result goes is checked before any work: a missing folder, a folder, a read-only
/// file are errors at once (with the user's path, no temporary file's name), and nothing is
/// written.
#[test]
fn output_locations_are_checked_before_the_work() {
    let dir = tempfile::tempdir().unwrap();
    images(&dir.path().join("imgs"));
    let train = |out: &str| {
        run(
            &[
                "train",
                "imgs",
                "--name",
                "p",
                "--word",
                "pot",
                "--train-steps",
                "100000",
                "-o",
                out,
            ],
            dir.path(),
        )
    };
    let start = std::time::Instant::now();
    let o = train("nope/c.safetensors");
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains("nope/c.safetensors") && e.contains("does not exist"),
        "{e}"
    );
    assert!(!e.contains("infusion-tmp"), "{e}");
    std::fs::create_dir(dir.path().join("adir")).unwrap();
    assert!(stderr(&train("adir")).contains("a folder, not a file"));
    let ro = dir.path().join("ro.safetensors");
    std::fs::write(&ro, b"keep").unwrap();
    let mut perms = std::fs::metadata(&ro).unwrap().permissions();
    perms.set_readonly(true);
    std::fs::set_permissions(&ro, perms).unwrap();
    assert!(stderr(&train("ro.safetensors")).contains("read-only: not replaced"));
    assert_eq!(std::fs::read(&ro).unwrap(), b"keep");
    // 100000 training steps would take hours: every refusal came before the first.
    assert!(
        start.elapsed() < Duration::from_secs(60),
        "{:?}",
        start.elapsed()
    );

    let o = run(
        &["generate", "x", "--steps", "1000", "-o", "nodir/x.png"],
        dir.path(),
    );
    assert!(
        stderr(&o).contains("nodir/x.png") && stderr(&o).contains("does not exist"),
        "{}",
        stderr(&o)
    );
}

/// SIGTERM stops training as Ctrl-C does: the deltas reached are saved, and the exit status
/// (143) says the run did not finish. SIGHUP (the terminal closed) is treated the same, with
/// its own status, 129 (issue 21, item 16: it killed the run with nothing saved).
#[cfg(unix)]
#[test]
fn sigterm_or_sighup_during_training_saves_what_was_learned() {
    for (signal, status) in [("TERM", 143), ("HUP", 129)] {
        let dir = tempfile::tempdir().unwrap();
        images(&dir.path().join("imgs"));
        let child = Command::new(env!("CARGO_BIN_EXE_infusion-repl"))
            .args([
                "train",
                "imgs",
                "--name",
                "p",
                "--word",
                "pot",
                "--train-steps",
                "100000",
                "--checkpoint-every",
                "1",
            ])
            .current_dir(dir.path())
            .env_remove("INFUSION_MODEL")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        wait_for(&dir.path().join("p-checkpoints/p-step000001.safetensors"));
        signal_child(&child, signal);
        let o = child.wait_with_output().unwrap();
        assert_eq!(o.status.code(), Some(status), "SIG{signal}: {}", stderr(&o));
        assert!(stderr(&o).contains("stopped at step"), "{}", stderr(&o));
        let c = Concept::load(&dir.path().join("p.safetensors")).unwrap();
        let steps = c.train["steps"].as_u64().unwrap();
        assert!((1..100000).contains(&steps), "{steps}");
    }
}

/// Waits (up to two minutes) for `path` to appear.
fn wait_for(path: &Path) {
    let start = std::time::Instant::now();
    while !path.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn signal_child(child: &std::process::Child, signal: &str) {
    let sent = Command::new("kill")
        .args([&format!("-{signal}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}

/// Issue 21, item 16: a signal during a recipe's `train_concept` stops the recipe (it went on
/// to generate and exited 0), after saving what was learned where it says.
#[cfg(unix)]
#[test]
fn a_signal_during_a_recipes_training_stops_the_recipe() {
    let dir = tempfile::tempdir().unwrap();
    images(&dir.path().join("imgs"));
    std::fs::write(
        dir.path().join("r.rhai"),
        "let m = load_model();\n\
         let c = m.train_concept(\"imgs\", \"p\", \"pot\", #{train_steps: 100000, checkpoint_every: 1});\n\
         print(\"went on \" + \"after the signal\");\n",
    )
    .unwrap();
    let state = dir.path().join("state");
    let child = Command::new(env!("CARGO_BIN_EXE_infusion-repl"))
        .args(["--no-images", "r.rhai"])
        .current_dir(dir.path())
        .env_remove("INFUSION_MODEL")
        .env("XDG_STATE_HOME", &state)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(&dir.path().join("p-checkpoints/p-step000001.safetensors"));
    signal_child(&child, "TERM");
    let o = child.wait_with_output().unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(143), "{err}");
    assert!(
        !String::from_utf8_lossy(&o.stdout).contains("went on"),
        "the recipe went on"
    );
    let saved = std::fs::read_dir(state.join("infusion-repl/rescued"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().contains("p-stopped-step"))
        .unwrap_or_else(|| panic!("nothing saved: {err}"));
    assert!(err.contains(&saved.display().to_string()), "{err}");
    assert_eq!(Concept::load(&saved).unwrap().name, "p");
}
