//! Every recipe in scripts/ runs end to end on the bundled tiny model, and what it produced is
//! checked; a recipe with a planted error fails with `FILE:LINE:COL: message`.

use std::path::Path;
use std::process::{Command, Output};

use candle_core::DType;
use infusion_repl::Concept;

use crate::common::{repo, tiny};

fn run_recipe(name: &str, args: &[&str], cwd: &Path) -> Output {
    let script = repo().join("scripts").join(name);
    Command::new(env!("CARGO_BIN_EXE_infusion-repl"))
        .arg("--no-images")
        .arg(script)
        .args(args)
        .current_dir(cwd)
        .env_remove("INFUSION_MODEL")
        .output()
        .expect("infusion-repl runs")
}

fn ok(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "exit {:?}: {err}", o.status.code());
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn size(path: &Path) -> (u32, u32) {
    let i = image::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (i.width(), i.height())
}

/// A concept for the tiny model with random deltas, saved at `dir/NAME.safetensors`.
fn write_concept(dir: &Path, name: &str, word: &str, seed: u64) {
    let sd = tiny();
    let mut c = Concept::zeros(
        name,
        word,
        sd.unet.attention_layers(),
        Some(sd.unet_fingerprint().into()),
    )
    .unwrap();
    for (i, d) in c.deltas.values_mut().enumerate() {
        *d = (infusion_repl::util::seeded_noise(seed * 100 + i as u64, d.dims()).unwrap() * 0.5)
            .unwrap();
    }
    c.save(&dir.join(format!("{name}.safetensors")), DType::F16)
        .unwrap();
}

#[test]
fn quickstart_writes_one_image() {
    let dir = tempfile::tempdir().unwrap();
    let out = ok(&run_recipe(
        "quickstart.rhai",
        &["a red teapot", "--out", "q.png", "--steps", "3"],
        dir.path(),
    ));
    assert!(out.contains("wrote q.png"), "{out}");
    assert_eq!(size(&dir.path().join("q.png")), (32, 32));
    // show() without a terminal names the file the recipe wrote, and writes no copy (issue 21,
    // item 11: every recipe left a second copy of each image under ./infusion-out/).
    assert_eq!(out.lines().last(), Some("q.png"), "{out}");
    assert!(!dir.path().join("infusion-out").exists());
}

/// Every recipe run without a terminal: no copies under ./infusion-out/ (they write their own
/// outputs and `show` names those).
#[test]
fn recipes_write_no_copies_of_what_they_save() {
    let dir = tempfile::tempdir().unwrap();
    let folder = repo().join("assets/example-concept");
    ok(&run_recipe(
        "single_concept.rhai",
        &[
            folder.to_str().unwrap(),
            "pot",
            "teapot",
            "--train-steps",
            "2",
            "--steps",
            "2",
        ],
        dir.path(),
    ));
    ok(&run_recipe(
        "multi_concept.rhai",
        &["a <pot> by a window", "pot.safetensors", "--steps", "2"],
        dir.path(),
    ));
    assert!(
        !dir.path().join("infusion-out").exists(),
        "a recipe dumped copies of its own images"
    );
}

#[test]
fn single_concept_trains_saves_and_generates() {
    let dir = tempfile::tempdir().unwrap();
    let folder = repo().join("assets/example-concept");
    let out = ok(&run_recipe(
        "single_concept.rhai",
        &[
            folder.to_str().unwrap(),
            "pot",
            "teapot",
            "--train-steps",
            "4",
            "--steps",
            "2",
            "--out",
            "results/sc",
        ],
        dir.path(),
    ));
    assert!(out.contains("trained Concept(<pot> = teapot"), "{out}");
    // The output folder did not exist: the recipe made it before training.
    let results = dir.path().join("results/sc");
    let c = Concept::load(&results.join("pot.safetensors")).unwrap();
    assert_eq!((c.name.as_str(), c.word.as_str()), ("pot", "teapot"));
    assert_eq!(c.train["steps"], 4);
    assert_eq!(c.base_model.as_deref(), Some(tiny().unet_fingerprint()));
    assert_eq!(size(&results.join("pot-0.png")), (64, 32));
    // Two rows of base | custom (32 px each, in cells as wide as "custom" needs at a legible
    // size), 4 px apart, each image labelled underneath and the prompt under the pair.
    let (w, h) = size(&results.join("pot-sheet.png"));
    assert!((2 * 32 + 4..=2 * 80 + 4).contains(&w), "{w}");
    assert!(h > 2 * (32 + 40) && h < 2 * (32 + 160) + 8, "{h}");
}

/// Issue 21, item 10: the sheet single_concept.rhai makes (stdlib layout::pairs) captions each
/// pair with its prompt, a line spanning both cells (a cell's own label stays inside its cell,
/// so only a caption crosses the gap between them), and no label runs off the sheet.
#[test]
fn the_single_concept_sheet_captions_each_pair_with_its_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let folder = repo().join("assets/example-concept");
    ok(&run_recipe(
        "single_concept.rhai",
        &[
            folder.to_str().unwrap(),
            "pot",
            "teapot",
            "--train-steps",
            "1",
            "--steps",
            "1",
            "--out",
            "sc",
        ],
        dir.path(),
    ));
    let sheet = image::open(dir.path().join("sc/pot-sheet.png"))
        .unwrap()
        .to_rgb8();
    let (w, h) = sheet.dimensions();
    let ink = |x: u32, y: u32| sheet.get_pixel(x, y).0.iter().all(|&c| c < 110);
    let cell = (w - 4) / 2;
    // Below the first pair's images, before the second pair's: text only (grey, where the
    // tiny model's images are colourful noise).
    let colourful = |x: u32, y: u32| {
        let p = sheet.get_pixel(x, y).0;
        p.iter().max().unwrap() - p.iter().min().unwrap() > 40
    };
    let second = (40..h)
        .find(|&y| (0..w).filter(|&x| colourful(x, y)).count() > w as usize / 2)
        .expect("the second pair");
    let crossing = (32..second).any(|y| (cell..cell + 4).any(|x| ink(x, y)));
    assert!(
        crossing,
        "no caption spans the pair ({w}x{h}, second pair at {second})"
    );
    // Rows of text (not of the images) keep their ink off the sheet's edges.
    let text_rows: Vec<u32> = (0..h)
        .filter(|&y| (0..w).filter(|&x| colourful(x, y)).count() < w as usize / 4)
        .collect();
    assert!(
        text_rows.iter().all(|&y| !ink(0, y) && !ink(w - 1, y)),
        "text touches the sheet's edges"
    );
}

#[test]
fn multi_concept_composes_two_concepts() {
    let dir = tempfile::tempdir().unwrap();
    write_concept(dir.path(), "mycat", "cat", 1);
    write_concept(dir.path(), "pot", "teapot", 2);
    let out = ok(&run_recipe(
        "multi_concept.rhai",
        &[
            "a <mycat> next to a <pot>",
            "mycat.safetensors",
            "pot.safetensors",
            "--steps",
            "2",
            "--out",
            "m.png",
        ],
        dir.path(),
    ));
    assert!(out.contains("concepts used: [\"mycat\", \"pot\"]"), "{out}");
    assert_eq!(size(&dir.path().join("m.png")), (64, 32));
    let base = image::open(dir.path().join("m.base.png")).unwrap();
    let custom = image::open(dir.path().join("m.custom.png")).unwrap();
    assert_ne!(
        base.as_bytes(),
        custom.as_bytes(),
        "the concepts change the image"
    );
}

#[test]
fn attention_maps_writes_tiles_words_and_raw_maps() {
    let dir = tempfile::tempdir().unwrap();
    write_concept(dir.path(), "pot", "teapot", 3);
    let out = ok(&run_recipe(
        "attention_maps.rhai",
        &[
            "a <pot> on a wooden table",
            "pot.safetensors",
            "--steps",
            "2",
            "--out",
            "am",
        ],
        dir.path(),
    ));
    assert!(out.contains("am.safetensors"), "{out}");
    // 6 tokens between bos and eos: "a teapot on a wooden table", each a 32 px tile in a cell
    // as wide as its longest word needs, 6 px apart, then the colour bar (6 px away, 12 wide,
    // its labels); labels under the tiles, and the figure's title under them.
    let (w, h) = size(&dir.path().join("am-C.png"));
    assert!(w > 6 * 38 - 6 + 6 + 12 && w < 6 * (32 + 30) + 80, "{w}");
    assert!(h > 32 + 30 && h < 32 + 120, "{h}");
    let (fw, fh) = size(&dir.path().join("am-F.png"));
    assert!(fw == w && fh.abs_diff(h) <= 4, "{fw}x{fh} and {w}x{h}");
    // Rows: <pot>, then "teapot", "wooden", "table" (words longer than 2 letters), each two
    // tiles (F and C) and a bar, on white, 6 px apart.
    let (ww, wh) = size(&dir.path().join("am-words.png"));
    assert!(ww > 2 * 38 - 6 + 18 && ww < 2 * (32 + 30) + 80, "{ww}");
    assert!(wh > 4 * (32 + 6) && wh < 4 * (32 + 60), "{wh}");
    let words = image::open(dir.path().join("am-words.png"))
        .unwrap()
        .to_rgb8();
    for (x, y) in [(0, 0), (ww - 1, 0), (0, wh - 1), (ww - 1, wh - 1)] {
        assert_eq!(
            words.get_pixel(x, y).0,
            [255, 255, 255],
            "corner ({x}, {y})"
        );
    }
    // Issue 21, item 10: each stream's figure is titled (F or C) under its token labels: a
    // line of text much wider than a tile.
    for stream in ["F", "C"] {
        let img = image::open(dir.path().join(format!("am-{stream}.png")))
            .unwrap()
            .to_rgb8();
        let title_rows = (h - 20..h).filter(|&y| {
            let xs: Vec<u32> = (0..w)
                .filter(|&x| img.get_pixel(x, y).0.iter().all(|&c| c < 110))
                .collect();
            xs.last()
                .zip(xs.first())
                .is_some_and(|(l, f)| l - f > 3 * 32)
        });
        assert!(title_rows.count() > 0, "am-{stream}.png has no title");
    }
    let maps = infusion_repl::sd::load_safetensors(
        &dir.path().join("am.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert!(maps.keys().any(|k| k.ends_with("/step1")));
}

#[test]
fn a_planted_error_reports_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.rhai");
    std::fs::write(
        &bad,
        "let m = load_model();\nlet x = 1;\nlet g = m.generate(\"a cat\", #{steps: 1, sede: 3});\n",
    )
    .unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_infusion-repl"))
        .arg(&bad)
        .current_dir(dir.path())
        .env_remove("INFUSION_MODEL")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    let expected = format!("{}:3:11: generate: unknown option `sede`", bad.display());
    assert!(err.contains(&expected), "{err}");
    assert!(
        err.contains("  let g = m.generate(") && err.contains("          ^"),
        "{err}"
    );

    std::fs::write(&bad, "let a = 1;\nlet b = (a + ;\n").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_infusion-repl"))
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(&format!("{}:2:", bad.display())), "{err}");
}

/// Every recipe parses its command line the same way: a wrong one prints the usage alone
/// (no script position, no caret) and exits 2; `--help` prints it with the recipe's header and
/// exits 0.
#[test]
fn a_wrong_command_line_prints_the_usage_and_help_prints_the_header() {
    let dir = tempfile::tempdir().unwrap();
    let o = run_recipe("single_concept.rhai", &["photos", "pot"], dir.path());
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        err.trim_end(),
        "error: missing WORD\nusage: single_concept.rhai FOLDER NAME WORD [--train-steps 500] [--out .] [--steps 50]"
    );
    let o = run_recipe("quickstart.rhai", &["--steps", "many"], dir.path());
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.starts_with("error: --steps takes a whole number, not `many`\nusage: quickstart.rhai"),
        "{err}"
    );
    let o = run_recipe("multi_concept.rhai", &["--help"], dir.path());
    let out = ok(&o);
    assert!(
        out.starts_with("usage: multi_concept.rhai PROMPT CONCEPT..."),
        "{out}"
    );
    assert!(out.contains("compose two or more saved concepts"), "{out}");
}

#[test]
fn recipes_say_what_they_do_and_which_args_they_take() {
    for e in std::fs::read_dir(repo().join("scripts")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().and_then(|e| e.to_str()) != Some("rhai") {
            continue;
        }
        let text = std::fs::read_to_string(&p).unwrap();
        let header: Vec<&str> = text.lines().take_while(|l| l.starts_with("//")).collect();
        let name = p.file_name().unwrap().to_str().unwrap();
        assert!(
            header.first().is_some_and(|l| l.contains(name)),
            "{name}: header names the recipe"
        );
        assert!(
            header.iter().any(|l| l.contains("ARGS")),
            "{name}: header lists its ARGS"
        );
    }
}

#[test]
fn everything_after_the_recipe_reaches_it_as_args() {
    let dir = tempfile::tempdir().unwrap();
    let s = dir.path().join("args.rhai");
    std::fs::write(&s, "print(`n=${ARGS.len()} ${ARGS}`);").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_infusion-repl"))
        .args(["--dtype", "f32"])
        .arg(&s)
        .args(["generate", "--steps", "3", "-o"])
        .output()
        .unwrap();
    let out = ok(&o);
    assert!(
        out.contains("n=4 [\"generate\", \"--steps\", \"3\", \"-o\"]"),
        "{out}"
    );
}

#[test]
fn overfitting_writes_curves_and_a_chart() {
    let dir = tempfile::tempdir().unwrap();
    let folder = repo().join("assets/example-concept");
    let o = run_recipe(
        "overfitting.rhai",
        &[
            folder.to_str().unwrap(),
            "pot",
            "teapot",
            "--checkpoints",
            "0,3",
            "--out",
            "curves",
            "--steps",
            "2",
            "--samples",
            "2",
            "--clip",
            repo().join("models/tiny-clip").to_str().unwrap(),
        ],
        dir.path(),
    );
    let out = ok(&o);
    assert!(out.contains("step | Fisher | W2"), "{out}");
    // Issue 21, item 11: the time is rounded (`curves: 4.89 s`, not nine decimals).
    let time = out
        .lines()
        .find(|l| l.starts_with("curves: "))
        .expect("the time");
    assert!(
        regex_like_seconds(time.trim_start_matches("curves: ")),
        "{time}"
    );
    let csv = std::fs::read_to_string(dir.path().join("curves/pot-curves.csv")).unwrap();
    assert_eq!(csv.lines().count(), 3, "{csv}");
    // Random scorers are said loudly and recorded with the numbers.
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("RANDOM weights") && err.contains("--clip DIR"),
        "{err}"
    );
    assert!(
        csv.lines()
            .nth(1)
            .unwrap()
            .contains("CLIP tiny-clip (RANDOM weights)"),
        "{csv}"
    );
    assert_eq!(size(&dir.path().join("curves/pot-curves.png")), (1080, 480));
}

/// `12.34 s`, `47.9 s` or `3 min 5 s`: a time as `timing::report` prints it.
fn regex_like_seconds(t: &str) -> bool {
    let digits = |s: &str, n: Option<usize>| {
        !s.is_empty() && s.chars().all(|c| c.is_ascii_digit()) && n.is_none_or(|n| s.len() == n)
    };
    if let Some((m, s)) = t.strip_suffix(" s").and_then(|t| t.split_once(" min ")) {
        return digits(m, None) && digits(s, None);
    }
    match t.strip_suffix(" s").and_then(|t| t.split_once('.')) {
        Some((whole, frac)) => {
            digits(whole, None) && digits(frac, Some(if whole.len() == 1 { 2 } else { 1 }))
        }
        None => false,
    }
}

/// Issue 21, item 11: stdlib `timing` prints times rounded for people: two decimals under
/// 10 s, one under a minute, then minutes and seconds.
#[test]
fn timing_prints_rounded_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("t.rhai");
    std::fs::write(
        &script,
        "import \"timing\" as timing;\n\
         for s in [0.004, 0.456, 9.996, 47.968786558, 125.4] { print(timing::seconds(s)); }\n\
         let t = timing::start();\n\
         let back = timing::report(t, \"phase\");\n\
         print(`returned ${type_of(back)}`);\n",
    )
    .unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_infusion-repl"))
        .arg(&script)
        .output()
        .unwrap();
    let out = ok(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        &lines[..5],
        ["0.00 s", "0.46 s", "10.0 s", "48.0 s", "2 min 5 s"],
        "{out}"
    );
    let phase = lines[5].strip_prefix("phase: ").expect("the report");
    assert!(regex_like_seconds(phase), "{out}");
    assert_eq!(
        lines[6], "returned f64",
        "report returns the seconds: {out}"
    );
}

/// Scripts report a cut prompt as the command line does (the warning comes from the library).
#[test]
fn a_cut_prompt_warns_in_scripts_too() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("long.rhai");
    std::fs::write(
        &script,
        "let m = load_model(); let p = \"\"; for i in 0..100 { p += \"teapot \"; } m.generate(p, #{steps: 1});",
    )
    .unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_infusion-repl"))
        .arg(&script)
        .current_dir(dir.path())
        .env_remove("INFUSION_MODEL")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("warning: the prompt") && err.contains("cut off"),
        "{err}"
    );
}

/// The toy recipe (foundations shortened to 60 steps, 8 customization steps): the six figures
/// and the measures' chart as PNGs of their panel rows, and a table with a row per method and
/// snapshot in which Infusion's Fisher divergence on the other concepts is 0 and W2 too.
#[test]
fn toy_overfitting_writes_its_figures_and_table() {
    let dir = tempfile::tempdir().unwrap();
    let o = run_recipe(
        "toy_overfitting.rhai",
        &["--out", "toy", "--steps", "8", "--foundation-steps", "60"],
        dir.path(),
    );
    let out = ok(&o);
    // Issue 21, item 11: each run's progress names its layout (both layouts are customized
    // with each method), and the phases' times are each phase's own, summing to the whole.
    let err = String::from_utf8_lossy(&o.stderr);
    for what in [
        "toy four_peaks foundation: step",
        "toy grid25 foundation: step",
        "toy four_peaks full: step",
        "toy grid25 full: step",
        "toy four_peaks infusion: step",
        "toy grid25 infusion: step",
    ] {
        assert!(err.contains(what), "{what}: {err}");
    }
    let seconds = |label: &str| -> f64 {
        let line = out
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{label}: ")))
            .unwrap_or_else(|| panic!("no `{label}:` time in {out}"));
        assert!(regex_like_seconds(line), "{line}");
        match line.trim_end_matches(" s").split_once(" min ") {
            Some((m, s)) => m.parse::<f64>().unwrap() * 60.0 + s.parse::<f64>().unwrap(),
            None => line.trim_end_matches(" s").parse().unwrap(),
        }
    };
    let phases =
        seconds("foundations") + seconds("full, both layouts") + seconds("infusion, both layouts");
    let total = seconds("toy_overfitting in all");
    assert!(
        phases <= total + 0.2 && phases > 0.5 * total,
        "phases {phases} s, in all {total} s: {out}"
    );
    let toy = dir.path().join("toy");
    // Four snapshots (0, 2, 4, 8) of 260 pixels, under a 30-pixel title; the scatter figures
    // have a 26-pixel legend strip under them.
    for (fig, h) in [("fig5", 316), ("fig6", 316), ("fig7", 290)] {
        for method in ["full", "infusion"] {
            assert_eq!(size(&toy.join(format!("{fig}_{method}.png"))), (1040, h));
        }
    }
    assert_eq!(size(&toy.join("measures.png")), (640, 426));
    let table = std::fs::read_to_string(toy.join("table.md")).unwrap();
    assert!(out.contains(&table), "the table is printed too");
    let rows: Vec<&str> = table.lines().skip(2).collect();
    assert_eq!(rows.len(), 8, "{table}");
    for r in &rows {
        let cells: Vec<&str> = r.split('|').map(str::trim).collect();
        if cells[1] == "infusion" || cells[2] == "0" {
            assert_eq!((cells[3], cells[4]), ("0.0 ± 0.0", "0.0"), "{r}");
        }
    }
    assert!(
        rows.iter()
            .any(|r| r.contains("| full | 8 |") && !r.contains("| 0.0 ± 0.0 |")),
        "{table}"
    );
}

/// `compare_methods.rhai`: a run writes the results and shows the charts; a second run finds
/// every cell there.
#[test]
fn compare_methods_recipe_runs_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let folder = repo().join("assets/example-concept");
    let args = [
        folder.to_str().unwrap(),
        "--name",
        "pot",
        "--word",
        "teapot",
        "--methods",
        "infusion,lora",
        "--checkpoints",
        "1",
        "--samples",
        "2",
        "--w2-prompts",
        "1",
        "--fisher-samples",
        "2",
        "--prompts",
        "1",
        "--images-per-prompt",
        "1",
        "--steps",
        "2",
        "--out",
        "cmp",
    ];
    let out = ok(&run_recipe("compare_methods.rhai", &args, dir.path()));
    assert!(out.contains("10 cells measured, 0 already there"), "{out}");
    assert!(dir.path().join("cmp/curves.csv").is_file());
    assert!(dir.path().join("cmp/fig11_fisher.png").is_file());
    let out = ok(&run_recipe("compare_methods.rhai", &args, dir.path()));
    assert!(out.contains("0 cells measured, 10 already there"), "{out}");
}
