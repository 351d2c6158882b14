//! The `infusion-repl` command README.md documents: the bundled tiny model by default, a model
//! from the Hugging Face cache by repo id, initial noise from a file, clear errors.

use std::path::Path;
use std::process::{Command, Output};

use crate::common::{get, reference, tiny_model_dir};

fn run(args: &[&str], cwd: &Path, env: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_infusion-repl"));
    cmd.args(args).current_dir(cwd).env_remove("INFUSION_MODEL");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("infusion-repl runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn generate_with_the_bundled_model_writes_a_png() {
    let dir = tempfile::tempdir().unwrap();
    let o = run(
        &["generate", "a red teapot", "--steps", "3", "-o", "t.png"],
        dir.path(),
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("bundled tiny model"), "{}", stderr(&o));
    let img = image::open(dir.path().join("t.png")).unwrap();
    assert_eq!((img.width(), img.height()), (32, 32));
}

#[test]
fn noise_file_reproduces_the_reference_image() {
    let dir = tempfile::tempdir().unwrap();
    let r = reference("txt2img.safetensors");
    let noise = dir.path().join("noise.safetensors");
    let t = std::collections::HashMap::from([("noise".to_string(), get(&r, "init_noise").clone())]);
    candle_core::safetensors::save(&t, &noise).unwrap();
    let o = run(
        &[
            "generate",
            "a photo of a cat sitting by a teapot",
            "--steps",
            "5",
            "--guidance",
            "7.5",
            "--noise",
            noise.to_str().unwrap(),
            "-o",
            "ref.png",
        ],
        dir.path(),
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let img = image::open(dir.path().join("ref.png")).unwrap().to_rgb8();
    let expected: Vec<f32> = get(&r, "image_01")
        .squeeze(0)
        .unwrap()
        .permute((1, 2, 0))
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    // At most one 8-bit level off (values on a rounding boundary).
    for (&p, &e) in img.as_raw().iter().zip(&expected) {
        assert!((p as f32 - (e * 255.0).round()).abs() <= 1.0);
    }
}

#[test]
fn repo_id_is_found_in_the_hf_home_cache() {
    let home = tempfile::tempdir().unwrap();
    let repo = home.path().join("hub/models--acme--tiny-sd");
    let snap = repo.join("snapshots/abc123");
    for sub in ["", "tokenizer", "text_encoder", "unet", "vae", "scheduler"] {
        let from = tiny_model_dir().join(sub);
        std::fs::create_dir_all(snap.join(sub)).unwrap();
        for e in std::fs::read_dir(&from).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_file() {
                std::fs::copy(e.path(), snap.join(sub).join(e.file_name())).unwrap();
            }
        }
    }
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "abc123\n").unwrap();
    let o = run(
        &[
            "--model",
            "acme/tiny-sd",
            "generate",
            "--steps",
            "2",
            "-o",
            "c.png",
        ],
        home.path(),
        &[("HF_HOME", home.path())],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(home.path().join("c.png").is_file());
    assert!(!stderr(&o).contains("bundled"), "{}", stderr(&o));
}

#[test]
fn errors_name_the_culprit_and_exit_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let o = run(
        &["--model", "nobody/nothing", "generate"],
        dir.path(),
        &[("HF_HOME", dir.path())],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("models--nobody--nothing"),
        "{}",
        stderr(&o)
    );

    let o = run(
        &["generate", "--width", "31", "--steps", "1"],
        dir.path(),
        &[],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("width"), "{}", stderr(&o));

    let o = run(&["--dtype", "f8", "generate"], dir.path(), &[]);
    assert!(stderr(&o).contains("`--dtype`"), "{}", stderr(&o));
    // The library names the option `device`; the command line calls it by its flag.
    let o = run(&["--device", "gpu", "generate"], dir.path(), &[]);
    assert!(stderr(&o).contains("`--device`: `gpu`"), "{}", stderr(&o));
    let o = run(
        &[
            "generate",
            "--steps",
            "1",
            "--replace-steps",
            "2",
            "--maps",
            "m.st",
        ],
        dir.path(),
        &[],
    );
    assert!(
        stderr(&o).contains("`--replace-steps`: 2"),
        "{}",
        stderr(&o)
    );
    // Nothing half-written.
    let pngs = std::fs::read_dir(dir.path()).unwrap().count();
    assert_eq!(pngs, 0);
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_without_the_feature_says_how_to_get_it() {
    let dir = tempfile::tempdir().unwrap();
    let o = run(&["--device", "cuda", "generate"], dir.path(), &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--features cuda"), "{}", stderr(&o));
}

#[test]
fn train_then_generate_with_the_concept() {
    let dir = tempfile::tempdir().unwrap();
    let imgs = dir.path().join("imgs");
    std::fs::create_dir(&imgs).unwrap();
    for i in 0..3u8 {
        image::RgbImage::from_fn(40, 40, |x, y| {
            image::Rgb([x as u8 * 5, y as u8 * 5, i * 80])
        })
        .save(imgs.join(format!("{i}.png")))
        .unwrap();
    }
    let o = run(
        &[
            "train",
            "imgs",
            "--name",
            "pot",
            "--word",
            "teapot",
            "--train-steps",
            "3",
            "--checkpoint-every",
            "2",
            // The batch of 4 in passes of 1 image (the memory setting, end to end).
            "--micro-batch",
            "1",
        ],
        dir.path(),
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let concept = infusion_repl::Concept::load(&dir.path().join("pot.safetensors")).unwrap();
    assert_eq!(concept.train["steps"], 3);
    assert!(dir
        .path()
        .join("pot-checkpoints/pot-step000002.safetensors")
        .is_file());

    let o = run(
        &[
            "generate",
            "a <pot> on a table",
            "--concept",
            "pot.safetensors",
            "--steps",
            "2",
            "--maps",
            "maps.safetensors",
            "-o",
            "pair.png",
        ],
        dir.path(),
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let pair = image::open(dir.path().join("pair.png")).unwrap();
    assert_eq!((pair.width(), pair.height()), (64, 32));
    assert!(dir.path().join("pair.base.png").is_file());
    assert!(dir.path().join("pair.custom.png").is_file());
    let maps = infusion_repl::sd::load_safetensors(
        &dir.path().join("maps.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert!(maps.keys().any(|k| k.starts_with("C/")));

    let o = run(
        &[
            "generate",
            "a <dog>",
            "--concept",
            "pot.safetensors",
            "--steps",
            "1",
        ],
        dir.path(),
        &[],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("<dog>"), "{}", stderr(&o));
}

/// The benchmark as a smoke run (nothing timed is asserted): every measurement is there, with
/// positive times and the ratios against its baselines, and the implementations it ran with
/// (the fused kernels here, so the smoke run covers that path too).
#[test]
fn bench_smoke_run_reports_every_measurement() {
    let dir = tempfile::tempdir().unwrap();
    let o = run(
        &[
            "--kernels",
            "fused",
            "bench",
            "--steps",
            "2",
            "--repeats",
            "1",
            "--json",
            "b.json",
        ],
        dir.path(),
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(table.contains("infusion pair"), "{table}");
    // Ratios are of times, and say so.
    assert!(table.contains("x the time of unet batch 2"), "{table}");
    assert!(
        table.contains("fused kernels, gemm + winograd 3x3 convolutions"),
        "{table}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("b.json")).unwrap()).unwrap();
    assert_eq!(json["kernels"], "fused");
    // A debug binary says so (its own kernels run at opt-level 1: not for timing).
    let build = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    assert!(json["build"].as_str().unwrap().starts_with(build), "{json}");
    let rows = json["rows"].as_array().unwrap();
    // Loading against reading the files, two UNet rows, the text encoder and the VAE decoder,
    // text-to-image and the pair (whole runs, then per step), a training step of each
    // registered method (in the registry's order), then the first self-attention and the first
    // group norm + SiLU alone: naive, and fused against it; then two 3x3 convolutions per UNet
    // level (channels in = out, then the up path's first: its own and the deeper level's
    // channels in), each level half the last one's size.
    let methods = infusion_repl::methods::names();
    let after = 10 + methods.len();
    let levels = crate::common::tiny()
        .unet
        .config()
        .block_out_channels
        .clone();
    assert_eq!(rows.len(), after + 4 + 2 * levels.len());
    let mut side = None;
    for (i, (pair, c)) in rows[after + 4..].chunks(2).zip(&levels).enumerate() {
        let name = pair[0]["name"].as_str().unwrap();
        let size: usize = name.rsplit('x').next().unwrap().parse().unwrap();
        assert!(name.starts_with(&format!("conv 3x3 2x{c}x")), "{name}");
        assert!(side.is_none_or(|s: usize| s.div_ceil(2) == size), "{name}");
        side = Some(size);
        let deeper = levels.get(i + 1).unwrap_or(c);
        let up = pair[1]["name"].as_str().unwrap();
        assert_eq!(
            up,
            format!("conv 3x3 2x{}x{size}x{size} -> {c}", c + deeper)
        );
    }
    // On Linux each CPU row carries the process's resident peak over its timed runs (started
    // over before them): at least the tiny model's weights, below anything absurd.
    if cfg!(target_os = "linux") && std::fs::write("/proc/self/clear_refs", "5").is_ok() {
        for r in rows {
            let mib = r["peak_memory_bytes"].as_u64().unwrap_or(0) >> 20;
            assert!((1..64 << 10).contains(&mib), "{r}");
        }
    }
    assert_eq!(rows[0]["name"], "read the weight files once");
    assert_eq!(rows[1]["ratio"][0], "reading its files");
    assert_eq!(rows[4]["name"], "text encoder, batch 2");
    assert_eq!(rows[5]["name"], "vae decode, per image");
    for (i, m) in methods.iter().enumerate() {
        // The default method's row carries no suffix; the others name theirs.
        let name = rows[10 + i]["name"].as_str().unwrap();
        assert!(name.starts_with("training step, batch 4"), "{name}");
        assert!(
            i == 0 || name.contains(m),
            "row {} is {name}, not {m}",
            10 + i
        );
        assert_eq!(rows[10 + i]["ratio"][0], "unet batch 4", "{}", rows[10 + i]);
    }
    for i in [after, after + 2] {
        assert!(
            rows[i]["name"].as_str().unwrap().ends_with("naive"),
            "{}",
            rows[i]
        );
        assert_eq!(rows[i + 1]["ratio"][0], "naive");
    }
    // Per-step rows are differences of two medians: never negative, the others positive.
    for r in rows {
        let per_step = r["name"].as_str().unwrap().ends_with("per step");
        assert!(r["seconds"].as_f64().unwrap() > 0.0 || per_step, "{r}");
        assert!(r["seconds"].as_f64().unwrap() >= 0.0, "{r}");
    }
    assert_eq!(rows[7]["name"], "text-to-image, per step");
    assert!(
        rows[7]["seconds"].as_f64() < rows[6]["seconds"].as_f64(),
        "{}",
        rows[7]
    );
    assert_eq!(rows[8]["ratio"][0], "text-to-image");
    assert!(rows[8]["ratio"][1].as_f64().unwrap() > 0.0);
    assert_eq!(rows[9]["name"], "infusion pair, per step");
    assert_eq!(rows[9]["ratio"][0], "text-to-image per step");
}

/// `--only` runs the groups named, and names the groups when one is unknown.
#[test]
fn bench_only_runs_the_groups_asked() {
    let dir = tempfile::tempdir().unwrap();
    let o = run(
        &[
            "bench",
            "--only",
            "load,unet",
            "--repeats",
            "1",
            "--json",
            "b.json",
        ],
        dir.path(),
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("b.json")).unwrap()).unwrap();
    let names: Vec<&str> = json["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "read the weight files once",
            "load the model",
            "unet forward, batch 2",
            "unet forward, batch 4"
        ]
    );
    let o = run(&["bench", "--only", "vea"], dir.path(), &[]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("groupnorm"), "{}", stderr(&o));
}

/// Under umask 022 every file the tool writes is readable by group and others (0644), as a
/// plain create would make it: images, concepts and checkpoints alike.
#[cfg(unix)]
#[test]
fn written_files_follow_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let imgs = dir.path().join("imgs");
    std::fs::create_dir(&imgs).unwrap();
    for i in 0..3u8 {
        image::RgbImage::from_fn(40, 40, |x, y| image::Rgb([x as u8, y as u8, i * 80]))
            .save(imgs.join(format!("{i}.png")))
            .unwrap();
    }
    let bin = env!("CARGO_BIN_EXE_infusion-repl");
    let script = format!(
        "umask 022 && '{bin}' generate x --steps 1 -o a.png && \
         '{bin}' train imgs --name pot --word teapot --train-steps 2 --checkpoint-every 1"
    );
    let o = Command::new("sh")
        .args(["-c", &script])
        .current_dir(dir.path())
        .env_remove("INFUSION_MODEL")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    for f in [
        "a.png",
        "pot.safetensors",
        "pot-checkpoints/pot-step000001.safetensors",
        "pot-checkpoints/pot-step000001.optim.safetensors",
    ] {
        let mode = std::fs::metadata(dir.path().join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o644, "{f}: {:o}", mode & 0o777);
    }
}

/// The benchmark hands over every row as soon as it is measured (the command line prints it and
/// rewrites the JSON then), so a run cut short keeps what it measured.
#[test]
fn bench_reports_each_row_as_it_is_measured() {
    let mut seen = vec![];
    let opts = infusion_repl::app::BenchOptions {
        steps: 1,
        repeats: 1,
        only: vec![],
        micro_batch: None,
    };
    let report = infusion_repl::app::run_bench(
        crate::common::tiny(),
        "tiny",
        &opts,
        None,
        &infusion_repl::Job::quiet(),
        &mut |r| {
            seen.push(r.rows.len());
            Ok(())
        },
    )
    .unwrap();
    assert_eq!(seen, (1..=report.rows.len()).collect::<Vec<_>>());
}

/// `--scheduler` picks the sampler (said in the PNG's parameters as other tools name it) and
/// a sampler without Karras sigmas refuses `--karras` in one line.
#[test]
fn scheduler_flag_picks_the_sampler() {
    let dir = tempfile::tempdir().unwrap();
    let o = run(
        &[
            "generate",
            "a red teapot",
            "--steps",
            "4",
            "--seed",
            "1",
            "--scheduler",
            "dpmpp_2m",
            "--karras",
            "-o",
            "d.png",
        ],
        dir.path(),
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let params = crate::first_hour::png_text(&dir.path().join("d.png"), "parameters").unwrap();
    assert!(params.contains("Sampler: DPM++ 2M Karras"), "{params}");
    let sched = crate::first_hour::png_text(&dir.path().join("d.png"), "scheduler").unwrap();
    assert_eq!(sched, "dpmpp_2m karras");
    let o = run(
        &[
            "generate",
            "a red teapot",
            "--scheduler",
            "euler_a",
            "--karras",
        ],
        dir.path(),
        &[],
    );
    assert!(!o.status.success());
    let e = stderr(&o);
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    assert!(e.contains("karras") && e.contains("euler_a"), "{e}");
    let o = run(&["generate", "x", "--scheduler", "lms"], dir.path(), &[]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("dpmpp_2m"), "{}", stderr(&o));
}

/// Issue 21, items 2, 8 and 9: global options before the command; `-n` without `-o` says the
/// files it writes; errors before any note; a prompt without its command; a misspelt global;
/// `--no-ema` named; INFUSION_HOME named; `-o` not a PNG name refused.
#[test]
fn the_command_line_edges_say_what_they_do() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let vae = tiny_model_dir().join("vae");
    let vae = vae.to_str().unwrap();
    // --vae before and after the command: the same image.
    for args in [
        vec![
            "--vae", vae, "generate", "a cat", "--steps", "1", "--seed", "1", "-o", "a.png",
        ],
        vec![
            "generate", "a cat", "--steps", "1", "--seed", "1", "-o", "b.png", "--vae", vae,
        ],
    ] {
        let o = run(&args, d, &[]);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    }
    assert_eq!(
        std::fs::read(d.join("a.png")).unwrap(),
        std::fs::read(d.join("b.png")).unwrap()
    );
    // `-n 2` without `-o`, image-1.png taken: the note names the files written.
    std::fs::write(d.join("image-1.png"), b"mine").unwrap();
    let o = run(&["generate", "a cat", "--steps", "1", "-n", "2"], d, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("image-1.png exists: writing image-1-0.png ... image-1-1.png"),
        "{}",
        stderr(&o)
    );
    assert!(d.join("image-1-0.png").is_file() && d.join("image-1-1.png").is_file());
    assert_eq!(std::fs::read(d.join("image-1.png")).unwrap(), b"mine");
    // A bad setting is the only thing said: no seed, no "image.png exists".
    let o = run(
        &["generate", "a cat", "--steps", "1", "--width", "31"],
        d,
        &[],
    );
    let err = stderr(&o);
    assert!(!o.status.success() && err.contains("width"), "{err}");
    assert!(!err.contains("seed ") && !err.contains("exists"), "{err}");
    // `-o x.jpg`: refused, nothing written.
    let o = run(
        &["generate", "a cat", "--steps", "1", "-o", "x.jpg"],
        d,
        &[],
    );
    assert!(
        stderr(&o).contains("give a name ending in .png"),
        "{}",
        stderr(&o)
    );
    assert!(!d.join("x.jpg").exists());
    // A prompt without `generate`.
    let o = run(&["a cat"], d, &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("infusion-repl generate \"a cat\""),
        "{}",
        stderr(&o)
    );
    // A misspelt global: clap's error with the tool's usage and the option meant.
    let o = run(&["--modle", "x", "generate", "a cat"], d, &[]);
    let err = stderr(&o);
    assert!(
        err.contains("'--modle'") && err.contains("--model"),
        "{err}"
    );
    assert!(!err.contains("FILE.rhai [ARGS]...\n\nFor"), "{err}");
    // --no-ema on a folder model is named as given.
    let o = run(&["--no-ema", "generate", "a cat", "--steps", "1"], d, &[]);
    assert!(stderr(&o).contains("`--no-ema`"), "{}", stderr(&o));
    // INFUSION_HOME pointing nowhere is named.
    let nowhere = d.join("nowhere");
    let o = run(
        &["generate", "a cat", "--steps", "1"],
        d,
        &[("INFUSION_HOME", &nowhere)],
    );
    assert!(stderr(&o).contains("INFUSION_HOME="), "{}", stderr(&o));
}

/// Issue 21, items 15 and 18: outputs that are inputs, or not regular files, are refused
/// before any work; a closed stdout or a full device ends quietly or as one error.
#[test]
fn outputs_never_replace_inputs_or_special_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let concept = d.join("pot.safetensors");
    let c = infusion_repl::Concept::zeros(
        "pot",
        "teapot",
        crate::common::tiny().unet.attention_layers(),
        Some(crate::common::tiny().unet_fingerprint().to_string()),
    )
    .unwrap();
    c.save(&concept, candle_core::DType::F32).unwrap();
    let before = std::fs::read(&concept).unwrap();
    let o = run(
        &[
            "generate",
            "a <pot>",
            "--steps",
            "1",
            "--concept",
            "pot.safetensors",
            "-o",
            "pot.safetensors",
        ],
        d,
        &[],
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("it is the input"), "{}", stderr(&o));
    assert_eq!(std::fs::read(&concept).unwrap(), before);
    // The model's own files.
    let model = d.join("model");
    crate::common::copy_dir(&tiny_model_dir(), &model);
    let weights = model.join("unet/diffusion_pytorch_model.safetensors");
    let model_arg = model.display().to_string();
    let weights_arg = weights.display().to_string();
    let o = run(
        &[
            "--model",
            &model_arg,
            "generate",
            "x",
            "--steps",
            "1",
            "-o",
            &weights_arg,
        ],
        d,
        &[],
    );
    assert!(
        stderr(&o).contains("a file of the input folder"),
        "{}",
        stderr(&o)
    );
    // The training images.
    let images = d.join("imgs");
    crate::common::copy_dir(
        &crate::common::repo().join("assets/example-concept"),
        &images,
    );
    let first = std::fs::read_dir(&images)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let shot = std::fs::read(&first).unwrap();
    let o = run(
        &[
            "train",
            "imgs",
            "--name",
            "pot",
            "--word",
            "teapot",
            "--train-steps",
            "1",
            "-o",
            first.to_str().unwrap(),
        ],
        d,
        &[],
    );
    assert!(
        stderr(&o).contains("a file of the input folder"),
        "{}",
        stderr(&o)
    );
    assert_eq!(std::fs::read(&first).unwrap(), shot);
    // A FIFO as an output: refused at once, and still a FIFO.
    let fifo = d.join("pipe.png");
    let path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o644) }, 0);
    let o = run(&["generate", "x", "--steps", "1", "-o", "pipe.png"], d, &[]);
    assert!(stderr(&o).contains("a FIFO"), "{}", stderr(&o));
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
    // A closed pipe on stdout ends quietly, the image written; a full device is one error.
    let mut child = Command::new(env!("CARGO_BIN_EXE_infusion-repl"))
        .args(["generate", "x", "--steps", "1", "-o", "piped.png"])
        .current_dir(d)
        .env_remove("INFUSION_MODEL")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    assert!(d.join("piped.png").is_file());
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_infusion-repl"))
        .args(["generate", "x", "--steps", "1", "-o", "full.png"])
        .current_dir(d)
        .env_remove("INFUSION_MODEL")
        .stdout(full)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("standard output"), "{}", stderr(&o));
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
}

/// The names issue 22 keeps: `train --method custom_diffusion -o DIR` writes diffusers' two
/// files into DIR and `train --method perfusion -o FILE.safetensors` one file; `generate
/// --concept PATH:WORD` takes both, and C's image differs from F's.
#[test]
fn custom_diffusion_and_perfusion_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let images = crate::common::repo().join("assets/example-concept");
    let images = images.to_str().unwrap();
    for (method, out, extra) in [
        ("custom_diffusion", "pot-cd", vec!["--lr", "0.001"]),
        (
            "perfusion",
            "pot.safetensors",
            vec!["--set", "accumulate=1"],
        ),
    ] {
        let mut args = vec![
            "train",
            images,
            "--name",
            "pot",
            "--word",
            "teapot",
            "--method",
            method,
            "--train-steps",
            "1",
            "-o",
            out,
        ];
        args.extend(extra);
        let o = run(&args, dir.path(), &[]);
        assert!(o.status.success(), "{method}: {}", stderr(&o));
        if method == "custom_diffusion" {
            for f in [
                "pytorch_custom_diffusion_weights.safetensors",
                "<new1>.safetensors",
            ] {
                assert!(dir.path().join(out).join(f).is_file(), "{f}");
            }
        }
        let png = format!("{method}.png");
        let concept = format!("{out}:teapot");
        let o = run(
            &[
                "generate",
                "a <pot> on a beach",
                "--concept",
                &concept,
                "--steps",
                "2",
                "-o",
                &png,
            ],
            dir.path(),
            &[],
        );
        assert!(o.status.success(), "{method}: {}", stderr(&o));
        let base = image::open(dir.path().join(format!("{method}.base.png"))).unwrap();
        let custom = image::open(dir.path().join(format!("{method}.custom.png"))).unwrap();
        assert_ne!(base.as_bytes(), custom.as_bytes(), "{method}: C is F");
    }
}

/// `compare` on a cluster: two Slurm array tasks (`--array=1-2`: indices from 1) each run
/// their shard into one folder, then `--merge` writes the results from both.
#[test]
fn compare_shards_from_slurms_environment_then_merges() {
    let dir = tempfile::tempdir().unwrap();
    let images = crate::common::repo().join("assets/example-concept");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "compare",
            images.to_str().unwrap(),
            "--name",
            "pot",
            "--word",
            "teapot",
            "--methods",
            "infusion,textual_inversion",
            "--checkpoints",
            "1",
            "--samples",
            "2",
            "--w2-prompts",
            "1",
            "--fisher-samples",
            "2",
            "--fisher-prompts",
            "2",
            "--prompts",
            "1",
            "--images-per-prompt",
            "1",
            "--steps",
            "2",
            "--out",
            "cmp",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    for task in ["1", "2"] {
        let a = args(&[]);
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_infusion-repl"));
        cmd.args(&refs)
            .current_dir(dir.path())
            .env_remove("INFUSION_MODEL")
            .env("SLURM_ARRAY_TASK_ID", task)
            .env("SLURM_ARRAY_TASK_COUNT", "2")
            .env("SLURM_ARRAY_TASK_MIN", "1");
        let o = cmd.output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        let shard = if task == "1" { "0/2" } else { "1/2" };
        assert!(
            stderr(&o).contains(&format!("shard {shard}")),
            "{}",
            stderr(&o)
        );
        assert!(!dir.path().join("cmp/curves.csv").exists());
    }
    // Task 1 ran infusion's cells, task 2 textual_inversion's.
    assert!(dir
        .path()
        .join("cmp/cells/pot/infusion/step000001.w2.0.json")
        .is_file());
    assert!(dir
        .path()
        .join("cmp/cells/pot/textual_inversion/step000001.w2.0.json")
        .is_file());
    let a = args(&["--merge"]);
    let refs: Vec<&str> = a.iter().map(String::as_str).collect();
    let o = run(&refs, dir.path(), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let csv = std::fs::read_to_string(dir.path().join("cmp/curves.csv")).unwrap();
    // 2 methods x 1 checkpoint x 6 metrics, and the header.
    assert_eq!(csv.lines().count(), 13, "{csv}");
    let table = std::fs::read_to_string(dir.path().join("cmp/table.md")).unwrap();
    assert!(table.contains("| infusion |") && table.contains("| textual_inversion |"));
}

/// A `compare` process killed (SIGKILL) in the middle of its work, then run again, ends with the
/// same results as a run never interrupted: cells and checkpoints are written whole or not at
/// all.
#[test]
fn a_killed_compare_resumes_to_the_same_results() {
    let dir = tempfile::tempdir().unwrap();
    let images = crate::common::repo().join("assets/example-concept");
    let args = |out: &str| -> Vec<String> {
        [
            "compare",
            images.to_str().unwrap(),
            "--name",
            "pot",
            "--word",
            "teapot",
            "--methods",
            "infusion,lora",
            "--checkpoints",
            "1,3",
            "--samples",
            "2",
            "--w2-prompts",
            "2",
            "--prompt-chunk",
            "1",
            "--prompts",
            "2",
            "--images-per-prompt",
            "1",
            "--steps",
            "2",
            "--out",
            out,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let whole = args("whole");
    let o = run(
        &whole.iter().map(String::as_str).collect::<Vec<_>>(),
        dir.path(),
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let cut = args("cut");
    let mut child = Command::new(env!("CARGO_BIN_EXE_infusion-repl"))
        .args(&cut)
        .current_dir(dir.path())
        .env_remove("INFUSION_MODEL")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Killed once a few cells are there (or when it is done, on a fast machine: then the
    // rerun has nothing to do, and the files must still agree).
    let cells = dir.path().join("cut/cells/pot");
    let count = || {
        walk(&cells)
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .count()
    };
    let start = std::time::Instant::now();
    while count() < 5 && start.elapsed().as_secs() < 120 {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    let o = run(
        &cut.iter().map(String::as_str).collect::<Vec<_>>(),
        dir.path(),
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    for f in ["curves.csv", "table.md"] {
        assert_eq!(
            std::fs::read_to_string(dir.path().join("cut").join(f)).unwrap(),
            std::fs::read_to_string(dir.path().join("whole").join(f)).unwrap(),
            "{f}"
        );
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![];
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}
