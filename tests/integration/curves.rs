//! Over-training curves on the tiny model: the metrics at each checkpoint, a CSV and a chart.

use infusion_repl::metrics::{overtraining_curves, CurveOptions};
use infusion_repl::train::TrainOptions;
use infusion_repl::util::load_folder;
use infusion_repl::Job;

use crate::common::{repo, tiny};

#[test]
fn curves_measure_every_checkpoint_and_draw_a_chart() {
    let sd = tiny();
    let (clip, dino) = crate::common::tiny_scorers();
    let images: Vec<_> = load_folder(&repo().join("assets/example-concept"))
        .unwrap()
        .images
        .into_iter()
        .map(|(_, i)| i)
        .collect();
    let out = tempfile::tempdir().unwrap();
    let opts = CurveOptions {
        checkpoints: vec![4, 0, 2],
        train: TrainOptions {
            lr: 0.1,
            ..Default::default()
        },
        fisher_prompts: vec!["a photo of a dog".into()],
        fisher_samples: 2,
        w2_samples: 3,
        eval_prompts: vec!["a {} in the snow".into()],
        images_per_prompt: 1,
        steps: 2,
        out_dir: out.path().to_path_buf(),
        ..Default::default()
    };
    let c = overtraining_curves(
        sd,
        &clip,
        &dino,
        &images,
        "pot",
        "teapot",
        &opts,
        &Job::quiet(),
    )
    .unwrap();
    let steps: Vec<usize> = c.points.iter().map(|p| p.step).collect();
    assert_eq!(steps, vec![0, 2, 4]);
    // Untrained: C is F, so the customized latents have the base's distribution.
    assert!(c.points[0].w2 < 1e-4, "{}", c.points[0].w2);
    assert!(c.points[2].w2 > c.points[0].w2);
    // Infusion never changes prompts without the concept.
    assert!(c.points.iter().all(|p| p.fisher == 0.0));
    for p in &c.points {
        assert!(p.clip_t.abs() <= 1.0 && p.clip_i.abs() <= 1.0 && p.dino_i.abs() <= 1.0);
    }
    let csv = std::fs::read_to_string(&c.csv).unwrap();
    assert_eq!(csv.lines().count(), 4, "{csv}");
    assert!(csv.starts_with("step,fisher,fisher_std_err,w2,clip_t,clip_i,dino_i"));
    let chart = image::open(&c.chart).unwrap();
    assert_eq!((chart.width(), chart.height()), (1080, 480));
    assert!(out.path().join("pot-step000004.safetensors").is_file());
}

/// Issue 21, item 10: the chart says what the scores were made with, and in red when the CLIP
/// or the DINO had random weights (the CSV's `scorers` column says so too): its sixth cell,
/// empty before, holds the note; real scorers get no red.
#[test]
fn the_chart_says_when_its_scorers_are_random() {
    use infusion_repl::metrics::{chart, CurvePoint};
    let points = |scorers: &str| -> Vec<CurvePoint> {
        (0..3)
            .map(|i| CurvePoint {
                step: i * 100,
                fisher: 0.01 * i as f64,
                fisher_std_err: 0.001,
                w2: 0.1 * i as f64,
                clip_t: 0.3,
                clip_i: 0.8,
                dino_i: 0.6,
                scorers: scorers.to_string(),
            })
            .collect()
    };
    let red = |img: &image::RgbImage, x0: u32, y0: u32| {
        (y0..y0 + 240)
            .flat_map(|y| (x0..x0 + 360).map(move |x| (x, y)))
            .filter(|&(x, y)| {
                let p = img.get_pixel(x, y).0;
                p[0] > 150 && p[1] < 90 && p[2] < 90
            })
            .count()
    };
    let dark = |img: &image::RgbImage| {
        (240..480)
            .flat_map(|y| (720..1080).map(move |x| (x, y)))
            .filter(|&(x, y)| img.get_pixel(x, y).0.iter().all(|&c| c < 100))
            .count()
    };
    let random = chart(&points(
        "CLIP tiny-clip (RANDOM weights), DINO tiny-dino (RANDOM weights)",
    ))
    .unwrap();
    assert_eq!(random.dimensions(), (1080, 480));
    assert!(
        red(&random, 720, 240) > 100,
        "no red note in the sixth cell"
    );
    assert!(dark(&random) > 50, "the scorers are named");
    let real = chart(&points("CLIP clip-vit-base-patch32, DINO dino-vits16")).unwrap();
    assert_eq!(red(&real, 720, 240), 0, "real scorers: no warning");
    assert!(dark(&real) > 50, "the scorers are named");
}
