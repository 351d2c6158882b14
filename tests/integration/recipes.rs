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
        *d = (infusion_repl::util::noise::seeded_noise(seed * 100 + i as u64, d.dims()).unwrap()
            * 0.5)
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
    // show() without a terminal saved the image and printed its path.
    let shown = out
        .lines()
        .find(|l| l.contains("infusion-out/show-"))
        .expect("a shown path");
    assert!(dir.path().join(shown.trim()).is_file());
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
    // Two rows of base | custom (32 px each), 4 px apart, each image labelled underneath.
    let (w, h) = size(&results.join("pot-sheet.png"));
    assert_eq!(w, 2 * 32 + 4);
    assert!(h > 2 * (32 + 8) + 4 && h < 2 * (32 + 40) + 4, "{h}");
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
    // 6 tokens between bos and eos: "a teapot on a wooden table", each a 32 px tile, 6 px
    // apart, then the colour bar (6 px away, 12 wide, its labels); labels under the tiles.
    let (w, h) = size(&dir.path().join("am-C.png"));
    assert!(w > 6 * 38 - 6 + 6 + 12 && w < 6 * 38 + 80, "{w}");
    assert!(h > 32 + 10 && h < 32 + 40, "{h}");
    assert_eq!(size(&dir.path().join("am-F.png")), (w, h));
    // Rows: <pot>, then "teapot", "wooden", "table" (words longer than 2 letters), each two
    // tiles (F and C) and a bar.
    let (ww, wh) = size(&dir.path().join("am-words.png"));
    assert!(ww > 2 * 38 - 6 + 18 && ww < 2 * 38 + 80, "{ww}");
    assert!(wh > 4 * (32 + 6) && wh < 4 * (32 + 40), "{wh}");
    let maps = infusion_repl::sd::weights::load_safetensors(
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
    let out = ok(&run_recipe(
        "toy_overfitting.rhai",
        &["--out", "toy", "--steps", "8", "--foundation-steps", "60"],
        dir.path(),
    ));
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
