//! The paper's comparison (issue 23) on the tiny models: shards then a merge give the whole
//! run's results exactly; a run cut off and resumed gives the same files; each cell's values are
//! the library's own functions on the same inputs; another run's settings are refused; the
//! results have one row (and one line) per method.

use std::path::{Path, PathBuf};

use infusion_repl::actions::{compare, CompareAsk};
use infusion_repl::compare::CompareOptions;
use infusion_repl::Job;

use crate::common::{repo, tiny};

fn ask(out: &Path) -> CompareAsk {
    CompareAsk {
        data: repo().join("assets/example-concept"),
        name: Some("pot".into()),
        word: Some("teapot".into()),
        options: CompareOptions {
            methods: vec!["infusion".into(), "lora".into()],
            checkpoints: vec![1, 2],
            samples: 2,
            w2_prompts: 1,
            fisher_samples: 2,
            fisher_prompts: 2,
            prompts: 1,
            images_per_prompt: 1,
            steps: 2,
            ..Default::default()
        },
        out: out.to_path_buf(),
        ..Default::default()
    }
}

fn read(p: PathBuf) -> String {
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Two shards (each one unit: a method on the concept) then a merge give the same
/// curves.csv and table.md as one unsharded run, exactly (the same seeds); the shards alone
/// write no results, and a merge before the second lists its cells as missing.
#[test]
fn two_shards_and_a_merge_equal_one_run() {
    let sd = tiny();
    let job = Job::quiet();
    let dir = tempfile::tempdir().unwrap();
    let whole = dir.path().join("whole");
    let all = compare(sd, &ask(&whole), &job).unwrap();
    let merged = all.merged.unwrap();
    assert!(merged.missing.is_empty());
    // 2 methods x 2 checkpoints x 5 measures.
    assert_eq!((all.run.cells_done, merged.cells), (20, 20));
    let split = dir.path().join("split");
    let mut first = ask(&split);
    first.shard = Some("0/2".into());
    let r = compare(sd, &first, &job).unwrap();
    assert!(r.merged.is_none());
    assert_eq!(r.run.cells_done, 10);
    assert!(!split.join("curves.csv").exists());
    let mut merge = ask(&split);
    merge.merge = true;
    let partial = compare(sd, &merge, &job).unwrap().merged.unwrap();
    assert_eq!(partial.missing.len(), 10);
    let mut second = ask(&split);
    second.shard = Some("1/2".into());
    compare(sd, &second, &job).unwrap();
    let m = compare(sd, &merge, &job).unwrap().merged.unwrap();
    assert!(m.missing.is_empty());
    for f in ["curves.csv", "table.md"] {
        assert_eq!(read(split.join(f)), read(whole.join(f)), "{f}");
    }
    // Run again: nothing to do.
    let again = compare(sd, &ask(&whole), &job).unwrap();
    assert_eq!((again.run.cells_done, again.run.cells_skipped), (0, 20));
}

/// A run cut off (a cell and the last training checkpoint of a unit lost, as a kill would
/// leave them) and resumed gives the same files; a run with other settings into the same
/// folder is refused, naming the setting; each cell equals the library's own functions.
#[test]
fn a_cut_off_run_resumes_to_the_same_results_and_cells_are_the_librarys() {
    use infusion_repl::compare::{Cell, Measure};
    use infusion_repl::metrics::{fisher_divergence, FisherOptions, Variant};
    let sd = tiny();
    let job = Job::quiet();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    compare(sd, &ask(&out), &job).unwrap();
    let csv = read(out.join("curves.csv"));
    let lora = out.join("cells/pot/lora");
    std::fs::remove_file(lora.join("step000002.w2.0.json")).unwrap();
    std::fs::remove_file(lora.join("step000002.fisher.json")).unwrap();
    let ck = out.join("concepts/pot/lora");
    std::fs::remove_file(ck.join("pot-step000002.optim.safetensors")).unwrap();
    std::fs::remove_file(ck.join("pot-step000002.safetensors")).unwrap();
    let r = compare(sd, &ask(&out), &job).unwrap();
    assert_eq!(r.run.cells_done, 2);
    assert_eq!(read(out.join("curves.csv")), csv);
    // Another run's settings.
    let mut other = ask(&out);
    other.options.samples = 3;
    let e = compare(sd, &other, &job).unwrap_err().to_string();
    assert!(e.contains("options.samples"), "{e}");
    // The Fisher cell is fisher_divergence on the checkpoint's concept, the size its file's.
    let cell: Cell = serde_json::from_str(&read(lora.join("step000002.fisher.json"))).unwrap();
    assert_eq!(cell.measure, Measure::Fisher);
    let mut set = infusion_repl::ConceptSet::new();
    let c = infusion_repl::methods::load(
        &infusion_repl::methods::ConceptRequest {
            path: ck.join("pot-step000002.safetensors"),
            ..Default::default()
        },
        Some(sd),
        &job,
    )
    .unwrap();
    set.add(c, false, &job);
    let (captions, _) = infusion_repl::methods::captions("builtin").unwrap();
    let f = fisher_divergence(
        sd,
        &Variant::Base,
        &Variant::Everywhere(&set),
        &captions[..2],
        &FisherOptions {
            samples: 2,
            gen_steps: 2,
            ..Default::default()
        },
        &job,
    )
    .unwrap();
    assert_eq!(cell.values[0].value, f.mean);
    assert!(
        f.mean > 0.0,
        "a LoRA changes the model on prompts without it"
    );
    // The W2 cell: wasserstein of F's and C's latents of its prompt, seeds 0 and 1.
    let w2: Cell = serde_json::from_str(&read(lora.join("step000002.w2.0.json"))).unwrap();
    let prompt = "a <pot> in the jungle";
    let (mut base, mut custom) = (vec![], vec![]);
    for seed in 0..2 {
        let g = infusion_repl::generate_pair(
            sd,
            &set,
            prompt,
            &infusion_repl::PairOptions {
                generate: infusion_repl::GenerateOptions {
                    seed,
                    steps: 2,
                    guidance: 7.5,
                    ..Default::default()
                },
                replace_steps: 1.0,
            },
            None,
            &job,
        )
        .unwrap();
        base.push(g.base_latents);
        custom.push(g.custom_latents);
    }
    let want = infusion_repl::metrics::wasserstein(
        &candle_core::Tensor::cat(&base, 0).unwrap(),
        &candle_core::Tensor::cat(&custom, 0).unwrap(),
        None,
    )
    .unwrap();
    assert_eq!(w2.values[0].value, want.w2);
    let size: Cell = serde_json::from_str(&read(lora.join("step000002.size.json"))).unwrap();
    let bytes = std::fs::metadata(ck.join("pot-step000002.safetensors"))
        .unwrap()
        .len();
    assert_eq!(size.values[0].value, bytes as f64);
}

/// The results: curves.csv has a row per method x checkpoint x metric; table.md one row per
/// method, as `--method` names it; the charts are titled PNGs.
#[test]
fn results_have_a_row_and_a_line_per_method() {
    let sd = tiny();
    let job = Job::quiet();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r");
    let m = compare(sd, &ask(&out), &job).unwrap().merged.unwrap();
    let csv = read(m.csv.clone());
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some("method,subject,step,metric,value,std_err,n,note")
    );
    // 2 methods x 2 steps x 6 metrics (bytes, fisher, w2, clip_t, clip_i, dino_i).
    assert_eq!(lines.count(), 24);
    let table = read(m.table.clone());
    let rows: Vec<&str> = table
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| method"))
        .collect();
    assert_eq!(rows.len(), 2, "{table}");
    assert!(
        rows[0].starts_with("| infusion |") && rows[1].starts_with("| lora |"),
        "{table}"
    );
    assert_eq!(m.charts.len(), 3);
    // Figure 12: a row per method, F's image then C's at each of the 2 checkpoints.
    let (grid_path, grid) = &m.charts[2];
    assert!(grid_path.ends_with("fig12_grid.png"));
    let side = 32; // the tiny model's images
    assert!(
        grid.width() >= 3 * side && grid.height() >= 2 * side,
        "{:?}",
        grid.dimensions()
    );
    for (p, img) in &m.charts[..2] {
        // 720 x 480, and the legend's strip below.
        assert!(
            img.width() == 720 && img.height() >= 480,
            "{:?}",
            img.dimensions()
        );
        let d = image::ImageReader::open(p).unwrap().decode().unwrap();
        assert_eq!(d.width(), 720);
    }
}

/// Bad input is one clear error before any work: a dataset whose list misses a subject's
/// class, a listed subject without images, an unknown method, a method's unknown option.
#[test]
fn bad_data_and_options_are_refused_before_any_work() {
    let sd = tiny();
    let job = Job::quiet();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("dataset");
    let pot = data.join("pot");
    std::fs::create_dir_all(&pot).unwrap();
    for e in std::fs::read_dir(repo().join("assets/example-concept")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "png") {
            std::fs::copy(&p, pot.join(p.file_name().unwrap())).unwrap();
        }
    }
    std::fs::create_dir_all(data.join("cup")).unwrap();
    std::fs::write(
        data.join("prompts_and_classes.txt"),
        "Classes\n\nsubject_name,class\npot,teapot\n\nPrompts\n",
    )
    .unwrap();
    let out = dir.path().join("out");
    let mut a = ask(&out);
    (a.data, a.name, a.word) = (data.clone(), None, None);
    let e = compare(sd, &a, &job).unwrap_err().to_string();
    assert!(e.contains("`cup` is not in the list"), "{e}");
    std::fs::write(
        data.join("prompts_and_classes.txt"),
        "subject_name,class\npot,teapot\ncup,cup\n",
    )
    .unwrap();
    let e = compare(sd, &a, &job).unwrap_err().to_string();
    assert!(e.contains("cup") && e.contains("image"), "{e}");
    let mut b = ask(&out);
    b.options.methods = vec!["infusion".into(), "magic".into()];
    let e = compare(sd, &b, &job).unwrap_err().to_string();
    assert!(e.contains("magic"), "{e}");
    let mut c = ask(&out);
    c.options.settings.insert(
        "lora".into(),
        [("depth".to_string(), serde_json::json!(3))]
            .into_iter()
            .collect(),
    );
    let e = compare(sd, &c, &job).unwrap_err().to_string();
    assert!(e.contains("depth"), "{e}");
    let mut d = ask(&out);
    d.options.settings.insert(
        "lora".into(),
        [("lr".to_string(), serde_json::json!(-1.0))]
            .into_iter()
            .collect(),
    );
    let e = compare(sd, &d, &job).unwrap_err().to_string();
    assert!(e.contains("lora.lr"), "{e}");
    assert!(!out.join("cells").exists(), "no work was done");
}

/// The measures over prompts are cells of `prompt_chunk` prompts (a value per prompt); the
/// results give the mean over all the prompts, with its standard error.
#[test]
fn prompts_are_measured_in_chunks_and_averaged_over_all() {
    use infusion_repl::compare::{mean_se, Cell};
    let sd = tiny();
    let job = Job::quiet();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("c");
    let mut a = ask(&out);
    a.options.methods = vec!["infusion".into()];
    a.options.checkpoints = vec![1];
    a.options.prompts = 3;
    a.options.prompt_chunk = 2;
    let m = compare(sd, &a, &job).unwrap().merged.unwrap();
    let cells = out.join("cells/pot/infusion");
    let chunk = |k: usize| -> Cell {
        serde_json::from_str(&read(cells.join(format!("step000001.scores.{k}.json")))).unwrap()
    };
    let (first, second) = (chunk(0), chunk(1));
    // Three scores for each prompt: 2 prompts, then 1.
    assert_eq!((first.values.len(), second.values.len()), (6, 3));
    assert!(!cells.join("step000001.scores.2.json").exists());
    let clip_t: Vec<f64> = first
        .values
        .iter()
        .chain(&second.values)
        .filter(|v| v.metric == "clip_t")
        .map(|v| v.value)
        .collect();
    let (mean, se) = mean_se(&clip_t);
    let csv = read(m.csv);
    let row = csv
        .lines()
        .find(|l| l.starts_with("infusion,pot,1,clip_t,"))
        .unwrap();
    let f: Vec<&str> = row.split(',').collect();
    assert_eq!(f[4].parse::<f64>().unwrap(), mean, "{row}");
    assert_eq!(f[5].parse::<f64>().unwrap(), se, "{row}");
    assert_eq!(f[6], "3", "{row}");
}

/// Prior preservation for a method that takes it (`prior`, `prior_images`): its class images
/// are made once and kept per subject, and the run differs from one without; a method that
/// takes none refuses it before any work.
#[test]
fn prior_preservation_for_the_methods_that_take_it() {
    let sd = tiny();
    let job = Job::quiet();
    let dir = tempfile::tempdir().unwrap();
    let with = |out: &Path, method: &str, prior: bool| {
        let mut a = ask(out);
        a.options.methods = vec![method.into()];
        a.options.checkpoints = vec![1];
        if prior {
            a.options.settings.insert(
                method.into(),
                [
                    ("prior".to_string(), serde_json::json!(true)),
                    ("prior_images".to_string(), serde_json::json!(1)),
                ]
                .into_iter()
                .collect(),
            );
        }
        a
    };
    let e = compare(
        sd,
        &with(&dir.path().join("ti"), "textual_inversion", true),
        &job,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("takes no prior preservation"), "{e}");
    let p = dir.path().join("prior");
    compare(sd, &with(&p, "lora", true), &job).unwrap();
    assert_eq!(walk_pngs(&p.join("class_images/pot")), 1);
    let q = dir.path().join("plain");
    compare(sd, &with(&q, "lora", false), &job).unwrap();
    let bytes =
        |d: &Path| std::fs::read(d.join("concepts/pot/lora/pot-step000001.safetensors")).unwrap();
    assert_ne!(bytes(&p), bytes(&q), "prior preservation changed nothing");
}

fn walk_pngs(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|r| {
            r.flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "png"))
                .count()
        })
        .unwrap_or(0)
}
