//! The evaluation runner: an interrupted and restarted run ends with the same CSV and table as
//! an uninterrupted one, and redoes nothing that was done.

use candle_core::DType;
use infusion_repl::metrics::{evaluate, EvalConcept, EvalOptions};
use infusion_repl::{Concept, Error, Job};

use crate::common::{repo, tiny};

fn concept_file(dir: &std::path::Path, name: &str, seed: u64) -> std::path::PathBuf {
    let sd = tiny();
    let mut c = Concept::zeros(
        name,
        "teapot",
        sd.unet.attention_layers(),
        Some(sd.unet_fingerprint().into()),
    )
    .unwrap();
    for (i, d) in c.deltas.values_mut().enumerate() {
        *d = (infusion_repl::util::seeded_noise(seed * 10 + i as u64, d.dims()).unwrap() * 0.3)
            .unwrap();
    }
    let p = dir.join(format!("{name}.safetensors"));
    c.save(&p, DType::F16).unwrap();
    p
}

#[test]
fn an_interrupted_run_resumes_to_the_same_table() {
    let sd = tiny();
    let (clip, dino) = crate::common::tiny_scorers();
    let work = tempfile::tempdir().unwrap();
    let images = repo().join("assets/example-concept");
    let concepts = vec![
        EvalConcept {
            file: concept_file(work.path(), "pot", 1),
            images: images.clone(),
        },
        EvalConcept {
            file: concept_file(work.path(), "kettle", 2),
            images,
        },
    ];
    let opts = |out: &str| EvalOptions {
        prompts: vec!["a {} in the snow".into(), "a {} on the beach".into()],
        images_per_prompt: 2,
        steps: 2,
        out_dir: work.path().join(out),
        ..Default::default()
    };

    let full = evaluate(
        sd,
        &clip,
        &dino,
        &concepts,
        &opts("full"),
        &Job::quiet(),
        &mut |_| Ok(()),
    )
    .unwrap();
    assert_eq!(full.rows.len(), 8);
    assert_eq!(full.summary.len(), 2);
    for r in &full.rows {
        assert!(r.clip_t.abs() <= 1.0 && r.clip_i.abs() <= 1.0 && r.dino_i.abs() <= 1.0);
        assert!(work.path().join("full").join(&r.image).is_file());
    }
    assert!(
        full.markdown.contains("| kettle | 4 |") && full.markdown.contains("| pot | 4 |"),
        "{}",
        full.markdown
    );
    // The scorers are recorded: the bundled ones, marked random.
    assert!(
        full.markdown.contains(
            "Scored with CLIP tiny-clip (RANDOM weights), DINO tiny-dino (RANDOM weights)."
        ),
        "{}",
        full.markdown
    );
    assert!(full.rows.iter().all(|r| r.scorers.contains("RANDOM")));

    // Stop after three images, then run again.
    let mut seen = 0;
    let e = evaluate(
        sd,
        &clip,
        &dino,
        &concepts,
        &opts("resumed"),
        &Job::quiet(),
        &mut |_| {
            seen += 1;
            if seen == 3 {
                Err(Error::Cancelled)
            } else {
                Ok(())
            }
        },
    )
    .expect_err("stopped");
    assert!(matches!(e, Error::Cancelled));
    let mut new_rows = 0;
    let resumed = evaluate(
        sd,
        &clip,
        &dino,
        &concepts,
        &opts("resumed"),
        &Job::quiet(),
        &mut |_| {
            new_rows += 1;
            Ok(())
        },
    )
    .unwrap();
    assert_eq!(new_rows, 5, "the three rows done are not redone");
    assert_eq!(resumed.rows, full.rows);
    assert_eq!(
        std::fs::read_to_string(&resumed.table).unwrap(),
        std::fs::read_to_string(&full.table).unwrap()
    );
    assert_eq!(
        std::fs::read_to_string(&resumed.csv).unwrap(),
        std::fs::read_to_string(&full.csv).unwrap()
    );
}
