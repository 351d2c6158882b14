//! What a new user trips over in the first hour (issue 11): the command line's defaults, help
//! and habits from other tools, the same rules everywhere.

use std::path::Path;
use std::process::Output;

fn run(args: &[&str], cwd: &Path) -> Output {
    crate::common::run_bin(args, cwd)
}

fn stderr(o: &Output) -> String {
    crate::common::stderr_of(o)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The PNG text chunk `key` of `path` (tEXt, or iTXt for text outside Latin-1).
pub(crate) fn png_text(path: &Path, key: &str) -> Option<String> {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).ok()?));
    let reader = decoder.read_info().ok()?;
    let info = reader.info();
    let latin1 = info
        .uncompressed_latin1_text
        .iter()
        .find(|t| t.keyword == key)
        .map(|t| t.text.clone());
    latin1.or_else(|| {
        info.utf8_text
            .iter()
            .find(|t| t.keyword == key)
            .and_then(|t| t.get_text().ok())
    })
}

/// Without -o an existing image.png is not overwritten: the next free number is taken and the
/// note says so. Without --seed (or with -1) the seed is random, printed and stored.
#[test]
fn default_output_is_numbered_and_default_seed_is_random_and_stored() {
    let dir = tempfile::tempdir().unwrap();
    let o = run(&["generate", "x", "--steps", "1"], dir.path());
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), "image.png");
    let seed = stderr(&o)
        .lines()
        .find_map(|l| l.strip_prefix("seed "))
        .expect("the random seed is printed")
        .to_string();
    assert_eq!(png_text(&dir.path().join("image.png"), "seed"), Some(seed));
    let o = run(
        &["generate", "x", "--steps", "1", "--seed", "-1"],
        dir.path(),
    );
    assert_eq!(stdout(&o).trim(), "image-1.png");
    assert!(
        stderr(&o).contains("image.png exists: writing image-1.png"),
        "{}",
        stderr(&o)
    );
    let o = run(
        &[
            "generate",
            "x",
            "--steps",
            "1",
            "--seed",
            "5",
            "-o",
            "image.png",
        ],
        dir.path(),
    );
    assert!(o.status.success());
    assert_eq!(
        png_text(&dir.path().join("image.png"), "seed").as_deref(),
        Some("5")
    );
}

/// `-n N` makes N images with consecutive seeds; fp16 is taken for f16.
#[test]
fn several_images_in_one_call_and_the_dtype_names_of_other_tools() {
    let dir = tempfile::tempdir().unwrap();
    let o = run(
        &[
            "--dtype", "fp16", "generate", "x", "--steps", "1", "-n", "2", "--seed", "7", "-o",
            "cat.png",
        ],
        dir.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    for (i, seed) in [(0, "7"), (1, "8")] {
        let p = dir.path().join(format!("cat-{i}.png"));
        assert_eq!(png_text(&p, "seed").as_deref(), Some(seed));
    }
}

/// A concept given but not used by the prompt is a warning; a mark of no loaded concept is an
/// error, with or without --concept (it used to pass through literally without one).
#[test]
fn one_rule_for_concept_marks() {
    let dir = tempfile::tempdir().unwrap();
    let o = run(
        &["generate", "a <pot> on a table", "--steps", "1"],
        dir.path(),
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("no concept named <pot> is loaded"),
        "{}",
        stderr(&o)
    );
    assert!(!dir.path().join("image.png").exists());

    let sd = crate::common::tiny();
    let c = infusion_repl::Concept::zeros(
        "pot",
        "teapot",
        sd.unet.attention_layers(),
        Some(sd.unet_fingerprint().into()),
    )
    .unwrap();
    c.save(&dir.path().join("pot.safetensors"), candle_core::DType::F16)
        .unwrap();
    let o = run(
        &[
            "generate",
            "a teapot",
            "--steps",
            "1",
            "--concept",
            "pot.safetensors",
        ],
        dir.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("<pot> is loaded but the prompt does not use it"),
        "{}",
        stderr(&o)
    );
}

/// A mistyped command is suggested, not read as a missing file; the subcommands' help puts
/// the model options apart, and the REPL-only flag is not among them.
#[test]
fn help_and_mistyped_commands() {
    let dir = tempfile::tempdir().unwrap();
    let o = run(&["gen", "a cat"], dir.path());
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("did you mean `generate`?"),
        "{}",
        stderr(&o)
    );
    let help = stdout(&run(&["train", "--help"], dir.path()));
    assert!(help.contains("Model options:"), "{help}");
    assert!(!help.contains("--no-images"), "{help}");
    let help = stdout(&run(&["generate", "--help"], dir.path()));
    for flag in [
        "--seed",
        "--steps",
        "--guidance",
        "--negative",
        "--width",
        "--height",
    ] {
        let mut lines = help
            .lines()
            .skip_while(|l| !l.trim_start().starts_with(flag));
        let line = lines.next().unwrap_or_default();
        // The text follows the flag and its value name, on its line or the next.
        let after = line
            .trim_start()
            .split_once('>')
            .map_or("", |(_, t)| t)
            .trim();
        let next = lines.next().unwrap_or_default().trim();
        let text = if after.is_empty() { next } else { after };
        assert!(
            !text.is_empty() && !text.starts_with("--"),
            "{flag} has no text:\n{help}"
        );
    }
}

/// Training into a log (stderr not a terminal) prints a line every tenth of the run, counting
/// steps as the end message does; without those the log was silent until the end.
#[test]
fn training_into_a_log_is_not_silent() {
    let dir = tempfile::tempdir().unwrap();
    let imgs = dir.path().join("imgs");
    std::fs::create_dir(&imgs).unwrap();
    for i in 0..3u8 {
        image::RgbImage::from_pixel(32, 32, image::Rgb([i * 80, 9, 9]))
            .save(imgs.join(format!("{i}.png")))
            .unwrap();
    }
    let o = run(
        &[
            "train",
            "imgs",
            "--name",
            "p",
            "--word",
            "pot",
            "--train-steps",
            "10",
        ],
        dir.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("train: step "))
        .map(|l| l.split(',').next().unwrap())
        .collect();
    let expected: Vec<String> = (1..=10).map(|k| format!("train: step {k}/10")).collect();
    assert_eq!(lines, expected, "{}", stderr(&o));
    assert!(stderr(&o).contains("step 10: loss"), "{}", stderr(&o));
}

/// Every image the tool writes carries AUTOMATIC1111's `parameters` chunk (prompt, negative
/// prompt, then steps, sampler, CFG scale, seed, size, model hash and name, concepts), the
/// pairs and grids of scripts too.
#[test]
fn images_carry_the_web_uis_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let o = run(
        &[
            "generate",
            "a red teapot",
            "--steps",
            "2",
            "--seed",
            "5",
            "--negative",
            "blurry",
            "-o",
            "t.png",
        ],
        dir.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let p = png_text(&dir.path().join("t.png"), "parameters").unwrap();
    let lines: Vec<&str> = p.lines().collect();
    assert_eq!(lines[0], "a red teapot");
    assert_eq!(lines[1], "Negative prompt: blurry");
    assert!(
        lines[2].starts_with(
            "Steps: 2, Sampler: DDIM, CFG scale: 8, Seed: 5, Size: 32x32, Model hash: "
        ) && lines[2].ends_with("Model: tiny-sd"),
        "{p}"
    );
    let script = dir.path().join("pair.rhai");
    std::fs::write(
        &script,
        "let m = load_model(); let g = m.generate(\"a cat\", #{steps: 1, seed: 3}); \
         hstack([g.base, g.custom]).save(\"pair.png\"); g.attention(\"cat\").save(\"maps.png\");",
    )
    .unwrap();
    let o = run(&[script.to_str().unwrap()], dir.path());
    assert!(o.status.success(), "{}", stderr(&o));
    for f in ["pair.png", "maps.png"] {
        let p = png_text(&dir.path().join(f), "parameters").unwrap_or_default();
        assert!(
            p.starts_with("a cat\nSteps: 1,") && p.contains("Seed: 3"),
            "{f}: {p}"
        );
    }
}

/// Issue 21, item 17: text outside Latin-1 (a CJK prompt, Greek, an emoji, combining accents)
/// no longer loses the image at the end: it is written as UTF-8 (iTXt) under the same keys,
/// and the `parameters` chunk reads back as written.
#[test]
fn any_text_is_kept_in_the_png() {
    let dir = tempfile::tempdir().unwrap();
    let prompt = "a photo of a 猫 and an ελάφι 🐈 by a cafe\u{301}";
    let o = run(
        &[
            "generate",
            prompt,
            "--steps",
            "1",
            "--seed",
            "2",
            "--negative",
            "ぼやけた",
            "-o",
            "u.png",
        ],
        dir.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let p = dir.path().join("u.png");
    assert_eq!(png_text(&p, "prompt").as_deref(), Some(prompt));
    let params = png_text(&p, "parameters").unwrap();
    assert!(
        params.starts_with(&format!("{prompt}\nNegative prompt: ぼやけた\n")),
        "{params}"
    );
    // Latin-1 text stays in tEXt chunks, where every reader finds it.
    assert_eq!(png_text(&p, "seed").as_deref(), Some("2"));
}
