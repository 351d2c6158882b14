//! Over-training curves on the tiny model: the metrics at each checkpoint, a CSV and a chart.

use infusion_repl::metrics::curves::{overtraining_curves, CurveOptions};
use infusion_repl::train::TrainOptions;
use infusion_repl::util::image_io::load_folder;
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
