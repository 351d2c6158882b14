//! The toy lab (the paper's section 3 in 2-D): a foundation that matches its mixture, the
//! methods' customizations, the measures, and bad input. The foundations are trained once per
//! test run with their layouts' defaults (tens of seconds each) and shared.

use std::sync::OnceLock;

use infusion_repl::toy::sample_peaks;
use infusion_repl::toy::{
    count_modes, customize, fisher, CustomizeOptions, Layout, Point, Toy, ToyMethod,
    ToyTrainOptions,
};
use infusion_repl::Job;
use rand::SeedableRng;

fn foundation(layout: Layout) -> &'static Toy {
    static FOUR: OnceLock<Toy> = OnceLock::new();
    static GRID: OnceLock<Toy> = OnceLock::new();
    let cell = match layout {
        Layout::FourPeaks => &FOUR,
        Layout::Grid25 => &GRID,
    };
    cell.get_or_init(|| {
        Toy::train(layout, &ToyTrainOptions::for_layout(layout), &Job::quiet()).unwrap()
    })
}

/// A script engine whose scope has `TOY`: the shared four-peak foundation saved in a temporary
/// folder (kept alive by the returned guard).
fn toy_engine() -> (rhai::Engine, rhai::Scope<'static>, tempfile::TempDir) {
    use infusion_repl::app::{build_engine, ScriptConfig, Session};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("four.safetensors");
    foundation(Layout::FourPeaks).save(&path).unwrap();
    let engine = build_engine(&Session::new(ScriptConfig {
        no_images: true,
        progress: false,
        ..ScriptConfig::default()
    }));
    let mut scope = rhai::Scope::new();
    scope.push("TOY", path.display().to_string());
    (engine, scope, dir)
}

fn w2(a: &[Point], b: &[Point]) -> f64 {
    let t = |p: &[Point]| {
        candle_core::Tensor::from_vec(
            p.iter().flatten().copied().collect::<Vec<f32>>(),
            (p.len(), 2),
            &candle_core::Device::Cpu,
        )
        .unwrap()
    };
    infusion_repl::metrics::wasserstein(&t(a), &t(b), None)
        .unwrap()
        .w2
}

/// Each concept's 500 samples (50 DDIM steps) against 500 true draws of its peak: the Gaussian
/// W2 below 0.15 (measured 0.03-0.09 with the defaults; the peaks are 3.0 apart, std 0.3).
#[test]
fn a_four_peak_foundation_matches_its_mixture() {
    let toy = foundation(Layout::FourPeaks);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    for c in 0..4 {
        let s = toy.sample(None, c, None, 500, 1).unwrap();
        let truth = sample_peaks(&Layout::FourPeaks.peaks(c), 0.3, 500, &mut rng);
        let d = w2(&s, &truth);
        assert!(d < 0.15, "concept {c}: W2 {d} to its peak");
    }
}

/// Concept-agnostic overfitting (figure 5) measured: on the other three concepts the Fisher
/// divergence is exactly 0 for Infusion and Textual Inversion (their prompts run the
/// foundation) and clearly positive for full fine-tuning (over 3 standard errors); on the
/// customized concept every method moved. Runs and snapshots are deterministic for a seed.
#[test]
fn infusion_leaves_the_other_concepts_exactly_and_full_tuning_does_not() {
    let toy = foundation(Layout::FourPeaks);
    let job = Job::quiet();
    let opts = |method| CustomizeOptions {
        method,
        steps: 200,
        snapshots: vec![0, 100],
        ..Default::default()
    };
    for method in [
        ToyMethod::Full,
        ToyMethod::Infusion,
        ToyMethod::TextualInversion,
    ] {
        let run = customize(toy, &opts(method), &job).unwrap();
        let (other, se) = fisher(toy, &run.last, &[1, 2, 3], 300, 3).unwrap();
        let (own, own_se) = fisher(toy, &run.last, &[0], 300, 3).unwrap();
        eprintln!("{method:?}: others {other} ± {se}, own {own} ± {own_se}");
        if method == ToyMethod::Full {
            assert!(
                other > 3.0 * se && other > 0.0,
                "{method:?}: {other} ± {se}"
            );
        } else {
            assert_eq!((other, se), (0.0, 0.0), "{method:?}");
        }
        assert!(own > 3.0 * own_se, "{method:?}: own {own} ± {own_se}");
        // Step 0 is the foundation: no divergence anywhere.
        let (zero, _) = fisher(toy, run.at(0).unwrap(), &[0, 1], 100, 3).unwrap();
        assert_eq!(zero, 0.0, "{method:?} at step 0");
        assert!(run.at(100).is_ok() && run.at(200).is_ok() && run.at(150).is_err());
        let again = customize(toy, &opts(method), &job).unwrap();
        assert_eq!(again.losses, run.losses, "{method:?} is not deterministic");
    }
}

/// Concept-specific overfitting (figure 6): the grid foundation's bare concept prompt covers
/// most of the 25 diversities (at least 15; about 20 measured), and full fine-tuning on a line
/// under 5 of them keeps hardly more than those 5 (at most 7).
#[test]
fn full_tuning_on_five_diversities_keeps_about_five() {
    let toy = foundation(Layout::Grid25);
    let peaks = Layout::Grid25.peaks(0);
    let std = Layout::Grid25.std();
    let base = count_modes(&toy.sample(None, 0, None, 1000, 1).unwrap(), &peaks, std);
    let run = customize(
        toy,
        &CustomizeOptions {
            method: ToyMethod::Full,
            diversities: 5,
            steps: 400,
            ..Default::default()
        },
        &Job::quiet(),
    )
    .unwrap();
    let tuned = count_modes(
        &toy.sample(Some(&run.last), 0, None, 1000, 1).unwrap(),
        &peaks,
        std,
    );
    eprintln!("modes: foundation {base}, full fine-tuning {tuned}");
    assert!(base >= 15, "the foundation covers {base} of 25");
    assert!(tuned <= 7, "full fine-tuning still covers {tuned}");
}

/// The exact W2 on known sets: a shuffled copy is 0 away, a copy moved by (0.3, -0.4) is 0.5
/// away (a translation's optimal matching is the identity), and it agrees with the Gaussian fit
/// on two large Gaussian samples to within sampling noise; sets of other sizes are refused.
#[test]
fn the_exact_w2_on_known_sets() {
    use infusion_repl::toy::exact_w2;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let a = sample_peaks(&[[0.0, 0.0]], 1.0, 200, &mut rng);
    let mut shuffled = a.clone();
    shuffled.reverse();
    shuffled.swap(3, 77);
    assert!(exact_w2(&a, &shuffled).unwrap() < 1e-4);
    let moved: Vec<Point> = a.iter().map(|p| [p[0] + 0.3, p[1] - 0.4]).collect();
    let d = exact_w2(&a, &moved).unwrap();
    assert!((d - 0.5).abs() < 1e-4, "{d}");
    let b = sample_peaks(&[[1.0, 0.0]], 1.0, 200, &mut rng);
    let (exact, gauss) = (exact_w2(&a, &b).unwrap(), w2(&a, &b));
    assert!(
        exact >= gauss - 0.05 && exact < gauss + 0.5,
        "exact {exact}, Gaussian {gauss}"
    );
    let e = exact_w2(&a, &b[..10]).unwrap_err().to_string();
    assert!(e.contains("200 and 10"), "{e}");
}

/// The mode counter on a known set: 17 of the 25 grid peaks with 30 points each (within
/// 3 sigma), 2 points near an 18th (under 1% of 522: not covered), 10 points far from all.
#[test]
fn the_mode_counter_counts_a_known_set() {
    let peaks = Layout::Grid25.peaks(0);
    let std = Layout::Grid25.std();
    let mut points = vec![];
    for p in &peaks[..17] {
        for i in 0..30 {
            let a = i as f32 * 0.7;
            points.push([p[0] + 2.5 * std * a.cos(), p[1] + 2.5 * std * a.sin()]);
        }
    }
    points.extend([[peaks[17][0], peaks[17][1]]; 2]);
    points.extend([[10.0, 10.0]; 10]);
    assert_eq!(points.len(), 522);
    assert_eq!(count_modes(&points, &peaks, std), 17);
    // 4 sigma away counts for none.
    let off: Vec<Point> = peaks.iter().map(|p| [p[0] + 4.0 * std, p[1]]).collect();
    assert_eq!(count_modes(&off, &peaks[..1], std), 0);
}

/// A saved toy loads back to the same samples; loading it as the other layout, or a file that
/// is no toy, is one error naming the file; unknown layouts and methods, a concept out of
/// range, n = 0 and snapshots past the run are refused by name.
#[test]
fn toy_files_and_bad_input() {
    let toy = foundation(Layout::FourPeaks);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("four.safetensors");
    toy.save(&path).unwrap();
    let back = Toy::load(&path, Some(Layout::FourPeaks)).unwrap();
    assert_eq!(
        back.sample(None, 2, None, 20, 9).unwrap(),
        toy.sample(None, 2, None, 20, 9).unwrap()
    );
    let e = Toy::load(&path, Some(Layout::Grid25))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("four.safetensors") && e.contains("four_peaks toy"),
        "{e}"
    );
    std::fs::write(dir.path().join("junk.safetensors"), b"not a toy").unwrap();
    let e = Toy::load(&dir.path().join("junk.safetensors"), None)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("junk.safetensors"), "{e}");

    let e = Layout::parse("three_peaks").unwrap_err().to_string();
    assert!(
        e.contains("three_peaks") && e.contains("four_peaks, grid25"),
        "{e}"
    );
    let e = ToyMethod::parse("lora").unwrap_err().to_string();
    assert!(e.contains("full, infusion, textual_inversion"), "{e}");
    let e = toy.sample(None, 4, None, 10, 0).unwrap_err().to_string();
    assert!(
        e.contains("4 is out of range") && e.contains("4 concept"),
        "{e}"
    );
    let e = Layout::FourPeaks.concept("middle").unwrap_err().to_string();
    assert!(e.contains("top_left"), "{e}");
    assert_eq!(Layout::FourPeaks.concept("bottom_left").unwrap(), 2);
    assert_eq!(Layout::FourPeaks.concept("3").unwrap(), 3);
    let e = toy.sample(None, 0, None, 0, 0).unwrap_err().to_string();
    assert!(e.contains("at least 1"), "{e}");
    let e = customize(
        toy,
        &CustomizeOptions {
            steps: 10,
            snapshots: vec![20],
            ..Default::default()
        },
        &Job::quiet(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("snapshots") || e.contains("step 20"), "{e}");
}

/// The script API as recipes call it (the names the issue pins): a toy read from a file,
/// customized with snapshots, sampled, measured; bad input is one error each and the engine
/// goes on.
#[test]
fn scripts_drive_the_toy_lab() {
    let (engine, mut scope, _dir) = toy_engine();
    let v: rhai::Array = engine
        .eval_with_scope(
            &mut scope,
            r#"let toy = toy_model(#{layout: "four_peaks", path: TOY});
               let c = toy.customize(#{method: "infusion", train_steps: 40, snapshots: [0, 20]});
               let others = toy_fisher(toy, c, ["top_right", 2, 3], #{samples: 200});
               let own = toy_fisher(toy, c, 0, #{samples: 200});
               let start = toy_fisher(toy, c.at(0), [0], #{samples: 200});
               let a = toy.sample(0, 300, #{seed: 1});
               let b = toy.sample(3, 300, #{seed: 1});
               [others.mean, own.mean > 0.0, start.mean, toy_w2(a, a, #{exact: true}) < 1e-6, toy_w2(a, b) > 3.0,
                toy_modes(toy, 0), c.steps, a.len(), a[0].len(), toy.concepts[1], c.method]"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let s: Vec<String> = v.iter().map(|x| x.to_string()).collect();
    assert_eq!(
        s,
        [
            "0.0",
            "true",
            "0.0",
            "true",
            "true",
            "1",
            "[0, 20, 40]",
            "300",
            "2",
            "top_right",
            "infusion"
        ]
    );
    for (script, says) in [
        (r#"toy_model(#{layout: "three_peaks"})"#, "four_peaks"),
        (
            r#"toy_model(#{layout: "grid25", path: TOY})"#,
            "four_peaks toy",
        ),
        (
            r#"toy_model(#{layout: "four_peaks", path: TOY}).sample(7, 10)"#,
            "out of range",
        ),
        (
            r#"toy_model(#{layout: "four_peaks", path: TOY}).sample(0, 0)"#,
            "at least 1",
        ),
        (
            r#"toy_model(#{layout: "four_peaks", path: TOY}).customize(#{method: "lora"})"#,
            "lora",
        ),
        (
            r#"toy_model(#{layout: "four_peaks", path: TOY}).customize(#{train_steps: 2}).at(1)"#,
            "no snapshot at step 1",
        ),
    ] {
        let e = engine
            .eval_with_scope::<rhai::Dynamic>(&mut scope, script)
            .unwrap_err()
            .to_string();
        assert!(e.contains(says), "{script}: {e}");
    }
}

/// The pictures: each an image of the asked size, white with the palette's colours present
/// (blue, then orange for the second set or line), the score field's arrows in blue; a figure
/// with three panels is three panels wide; bad input is refused by name.
#[test]
fn scatter_score_field_and_line_chart_draw_what_they_are_given() {
    use infusion_repl::app::Img;
    let (engine, mut scope, _dir) = toy_engine();
    let imgs: rhai::Array = engine
        .eval_with_scope(
            &mut scope,
            r#"let toy = toy_model(#{path: TOY});
               let c = toy.customize(#{method: "full", train_steps: 20, snapshots: [10]});
               let panel = |title, m| #{title: title, sets: [
                   #{label: "top_left", points: m.sample(0, 200)},
                   #{label: "top_right", points: m.sample(1, 200)}]};
               [scatter([panel.call("base", toy), panel.call("step 10", c.at(10)), panel.call("step 20", c)],
                        #{title: "figure 5", size: 200}),
                line_chart([#{label: "full", x: [0, 10, 20], y: [0.0, 0.01, 0.02], err: [0.0, 0.002, 0.003]},
                            #{label: "infusion", x: [0, 10, 20], y: [0.0, 0.0, 0.0]}],
                           #{y_title: "Fisher divergence", width: 500, height: 300}),
                score_field([toy, c], 1, #{t: 50, grid: 9, size: 160})]"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let imgs: Vec<Img> = imgs.into_iter().map(|i| i.cast::<Img>()).collect();
    if let Ok(dir) = std::env::var("TOY_PLOTS_TO") {
        for (i, img) in imgs.iter().enumerate() {
            img.rgb.save(format!("{dir}/plot{i}.png")).unwrap();
        }
    }
    let sizes: Vec<(u32, u32)> = imgs.iter().map(|i| i.rgb.dimensions()).collect();
    // The scatter and the line chart have a 26-pixel legend strip under them (their sets are
    // labelled); the score field has none.
    assert_eq!(sizes, [(600, 256), (500, 326), (320, 160)]);
    // The legend strip names the sets in their colours, under the plots.
    let strip = |img: &Img, rgb: [u8; 3]| {
        let h = img.rgb.height();
        (h - 26..h).any(|y| (0..img.rgb.width()).any(|x| img.rgb.get_pixel(x, y).0 == rgb))
    };
    assert!(strip(&imgs[0], [31, 119, 180]) && strip(&imgs[0], [255, 127, 14]));
    let has = |img: &Img, rgb: [u8; 3]| img.rgb.pixels().filter(|p| p.0 == rgb).count();
    let (blue, orange) = ([31, 119, 180], [255, 127, 14]);
    assert!(
        has(&imgs[0], blue) > 50 && has(&imgs[0], orange) > 50,
        "scatter colours"
    );
    assert!(
        has(&imgs[1], blue) > 50 && has(&imgs[1], orange) > 50,
        "line colours"
    );
    assert!(has(&imgs[2], blue) > 50, "arrows");
    for img in &imgs {
        assert!(
            has(img, [255, 255, 255]) > img.rgb.len() / 6,
            "a white background"
        );
        // Text (ticks, titles) is black.
        assert!(has(img, [0, 0, 0]) > 30, "no text drawn");
    }
    for (script, says) in [
        ("line_chart([#{y: [1, 2], x: [1]}])", "as long as"),
        (
            r#"scatter(#{sets: [#{points: [[1, 2], [3]]}]})"#,
            "element 1 is not a point",
        ),
        (r#"scatter([], #{range: [1, 0, 0, 1]})"#, "range"),
        (
            r#"score_field(toy_model(#{path: TOY}), 0, #{t: 1000})"#,
            "t",
        ),
    ] {
        let e = engine
            .eval_with_scope::<rhai::Dynamic>(&mut scope, script)
            .unwrap_err()
            .to_string();
        assert!(e.contains(says), "{script}: {e}");
    }
}

/// Issue 21, item 16: charts and the toy's W2 refuse numbers that are not finite (or not
/// finite once made f32, as points and frames are), and ranges wider than a float holds, with
/// an error that says which; huge finite ranges draw. Nothing hangs: each script runs on its
/// own thread and the test fails after 30 seconds instead of waiting for ever (plotters' tick
/// placement and nalgebra's SVD never finished on such input).
#[test]
fn charts_and_toy_w2_refuse_non_finite_numbers_and_never_hang() {
    fn run(script: &'static str) -> Result<String, String> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use infusion_repl::app::{build_engine, ScriptConfig, Session};
            let engine = build_engine(&Session::new(ScriptConfig {
                no_images: true,
                progress: false,
                ..ScriptConfig::default()
            }));
            let r = engine
                .eval::<rhai::Dynamic>(script)
                .map(|v| v.to_string())
                .map_err(|e| e.to_string());
            let _ = tx.send(r);
        });
        rx.recv_timeout(std::time::Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("{script}: still running after 30 s (hung)"))
    }
    let cases: &[(&str, Option<&str>)] = &[
        ("line_chart([#{y: [0.0, 1e308 * 10.0]}])", Some("point 1: y = inf is not a finite number")),
        ("line_chart([#{label: \"f\", y: [0.0, 0.0 / 0.0]}])", Some("line 0 (`f`), point 1: y = NaN")),
        ("line_chart([#{y: [-1e308, 1e308]}])", Some("wider than a chart can draw")),
        ("line_chart([#{x: [-1e308, 1e308], y: [0.0, 1.0]}])", Some("wider than a chart can draw")),
        ("line_chart([#{y: [0.0, 1.0], err: [1e308, 1e308]}])", Some("wider than a chart can draw")),
        ("line_chart([#{y: [0.0, 1e308]}])", None),
        ("line_chart([#{x: [0.0, 1e308], y: [0.0, 1.0]}])", None),
        ("scatter(#{sets: [#{points: [[0.0, 0.0]]}]}, #{range: [0.0, 1e308 * 10.0, 0.0, 1.0]})", Some("range: inf is not a finite number")),
        ("scatter(#{sets: [#{points: [[0.0, 0.0]]}]}, #{range: [-1e300, 1e300, 0.0, 1.0]})", Some("range: -1e300 is not a finite number")),
        ("scatter(#{sets: [#{points: [[0.0, 0.0]]}]}, #{range: [-3e38, 3e38, 0.0, 1.0]})", Some("wider than a chart can draw")),
        ("scatter(#{sets: [#{points: [[0.0, 0.0], [1e300, 0.0]]}]})", Some("points: element 1")),
        ("scatter(#{sets: [#{points: [[0.0, 0.0 / 0.0]]}]})", Some("points: element 0")),
        ("scatter(#{sets: [#{points: [[0.0, 0.0]]}]}, #{range: [-1e38, 1e38, -1.0, 1.0]})", None),
        ("toy_w2([[0.0, 0.0], [1.0, 1.0], [0.0 / 0.0, 0.0]], [[0.0, 1.0], [1.0, 0.0], [2.0, 2.0]])", Some("points_a: element 2")),
        ("toy_w2([[0.0, 0.0], [1.0, 1.0], [1e300, 0.0]], [[0.0, 1.0], [1.0, 0.0], [2.0, 2.0]])", Some("points_a: element 2")),
        ("toy_w2([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]], [[0.0, 1.0], [1.0, 0.0], [1e308 * 10.0, 2.0]])", Some("points_b: element 2")),
        ("toy_w2([[0.0, 0.0], [1.0, 1.0], [1e5, 0.0]], [[0.0, 1.0], [1.0, 0.0], [2.0, 2.0]], #{exact: true})", Some("farther out")),
        ("toy_w2([[0.0, 0.0], [1.0, 1.0], [1e30, 0.0]], [[0.0, 1.0], [1.0, 0.0], [2.0, 2.0]])", None),
    ];
    for (script, refused) in cases {
        match (refused, run(script)) {
            (Some(says), Err(e)) => assert!(e.contains(says), "{script}: {e}"),
            (None, Ok(_)) => {}
            (expected, r) => panic!("{script}: expected {expected:?}, got {r:?}"),
        }
    }
}
