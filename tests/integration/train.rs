//! Infusion training: the loss and its gradients against reference/train_grad.safetensors
//! (tolerance 1e-4 relative for single passes, as tests/fixtures/README.md suggests), image
//! loading, and runs on the tiny model: the loss goes down, runs are deterministic, a resumed
//! run continues the same curve, Ctrl-C keeps the Δs, a NaN stops with the last good Δs.

use std::collections::BTreeMap;

use candle_core::{Device, Var};
use infusion_repl::infusion::{infusion_loss, trained_concept as concept, trainer, Deltas};
use infusion_repl::train::TrainOptions;
use infusion_repl::util::load_folder;
use infusion_repl::{Job, StableDiffusion};

use crate::common::{assert_close, get, max_abs, reference, tiny};

#[test]
fn loss_and_gradients_match_reference() {
    check_loss_and_gradients(tiny());
}

/// The Infusion loss and the Δ gradients on `sd` (the tiny model, loaded with some kernels)
/// against the reference.
pub(crate) fn check_loss_and_gradients(sd: &StableDiffusion) {
    let r = reference("train_grad.safetensors");
    let ts: Vec<usize> = get(&r, "t")
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|t| t as usize)
        .collect();
    let pos: Vec<usize> = get(&r, "concept_token_indices")
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|i| i as usize)
        .collect();
    let tokens = sd.tokenize("a photo of a cat").unwrap();
    assert_eq!(
        tokens.positions_of_word("a photo of a cat", "cat"),
        vec![pos.clone()]
    );
    let ctx = sd.text_states(&[&tokens, &tokens]).unwrap();
    assert_close(&ctx, get(&r, "encoder_hidden_states"), 1e-4, "text states");
    let vars: BTreeMap<String, Var> = sd
        .unet
        .attention_layers()
        .into_iter()
        .filter(|l| l.kind == infusion_repl::AttnKind::CrossAttention)
        .map(|l| (l.path.clone(), Var::from_tensor(get(&r, &l.path)).unwrap()))
        .collect();
    let deltas = vars
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    let loss = infusion_loss(
        sd,
        get(&r, "z0"),
        &ts,
        get(&r, "eps"),
        &ctx,
        &[&pos, &pos],
        &deltas,
    )
    .unwrap();
    assert_close(&loss, get(&r, "loss"), 1e-5, "loss");
    let grads = loss.backward().unwrap();
    for (k, v) in &vars {
        let g = grads
            .get(v.as_tensor())
            .expect("a gradient for every layer");
        let expected = get(&r, &format!("grad.{k}"));
        // Gradients are ~1e-3: compare relative to the reference's own size.
        let scale = max_abs(expected);
        let err = max_abs(
            &(g.to_device(&Device::Cpu).unwrap() - expected.to_device(&Device::Cpu).unwrap())
                .unwrap(),
        );
        assert!(
            err <= 1e-4 * scale.max(1e-3),
            "{k}: error {err:e} (reference size {scale:e})"
        );
    }
}

/// Three small images of different kinds: RGB png, grayscale jpg, RGBA 16-bit png, webp.
fn image_folder() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let rgb = image::RgbImage::from_fn(40, 30, |x, y| {
        image::Rgb([(x * 6) as u8, (y * 8) as u8, 128])
    });
    rgb.save(p.join("a.png")).unwrap();
    let gray = image::GrayImage::from_fn(30, 50, |x, y| image::Luma([((x + y) * 4) as u8]));
    gray.save(p.join("b.jpg")).unwrap();
    let rgba16 = image::ImageBuffer::<image::Rgba<u16>, Vec<u16>>::from_fn(36, 36, |x, _| {
        image::Rgba([
            60000,
            1000,
            (x * 1000) as u16,
            if x < 18 { 65535 } else { 0 },
        ])
    });
    rgba16.save(p.join("c.png")).unwrap();
    image::DynamicImage::ImageRgb8(rgb)
        .save(p.join("d.webp"))
        .unwrap();
    std::fs::write(p.join("notes.txt"), "not an image").unwrap();
    dir
}

#[test]
fn training_images_of_every_kind_load_as_rgb() {
    let dir = image_folder();
    let imgs = load_folder(dir.path()).unwrap().images;
    let names: Vec<_> = imgs
        .iter()
        .map(|(p, _)| p.file_name().unwrap().to_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["a.png", "b.jpg", "c.png", "d.webp"]);
    // Transparent pixels come out white, opaque ones keep their colour (16 -> 8 bit).
    let c = &imgs[2].1;
    assert_eq!(c.get_pixel(30, 5).0, [255, 255, 255]);
    assert_eq!(c.get_pixel(2, 5).0[0], 233);
    let sq = infusion_repl::util::square_crop(&imgs[1].1, 32);
    assert_eq!(sq.dimensions(), (32, 32));
    let e = load_folder(&dir.path().join("nope")).unwrap_err();
    assert!(e.to_string().contains("nope"), "{e}");
    let empty = tempfile::tempdir().unwrap();
    let e = load_folder(empty.path()).unwrap_err();
    assert!(e.to_string().contains("no jpg, png or webp"), "{e}");
}

/// A FIFO named like an image would block forever when opened, and one unreadable file must
/// not refuse the rest: both are skipped, each with its reason; a folder with nothing readable
/// is an error that lists them.
#[cfg(unix)]
#[test]
fn fifos_and_unreadable_images_are_skipped_with_a_reason() {
    let dir = image_folder();
    let fifo = dir.path().join("e.png");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    std::fs::write(dir.path().join("f.jpg"), b"not a jpeg").unwrap();
    let f = load_folder(dir.path()).unwrap();
    assert_eq!(f.images.len(), 4);
    assert_eq!(f.skipped.len(), 2, "{:?}", f.skipped);
    assert!(f.skipped[0].contains("e.png") && f.skipped[0].contains("not a regular file"));
    assert!(f.skipped[1].contains("f.jpg"), "{:?}", f.skipped);
    let job = Job::collecting();
    let imgs = infusion_repl::util::load_folder_images(dir.path(), &job).unwrap();
    assert_eq!(
        (imgs.len(), job.messages().len()),
        (4, 2),
        "{:?}",
        job.messages()
    );

    let bad = tempfile::tempdir().unwrap();
    std::fs::write(bad.path().join("x.png"), b"nope").unwrap();
    let e = load_folder(bad.path()).unwrap_err().to_string();
    assert!(
        e.contains("no readable image") && e.contains("x.png"),
        "{e}"
    );
}

fn images() -> Vec<image::RgbImage> {
    let dir = image_folder();
    load_folder(dir.path())
        .unwrap()
        .images
        .into_iter()
        .map(|(_, i)| i)
        .collect()
}

fn opts(steps: usize) -> TrainOptions {
    TrainOptions {
        steps,
        lr: 0.1,
        seed: 3,
        ..Default::default()
    }
}

fn deltas_diff(a: &infusion_repl::Concept, b: &infusion_repl::Concept) -> f32 {
    a.deltas
        .iter()
        .map(|(k, d)| max_abs(&(d - &b.deltas[k]).unwrap()))
        .fold(0.0, f32::max)
}

#[test]
fn training_lowers_the_loss_on_a_fixed_evaluation_set() {
    let imgs = images();
    let mut t = trainer(tiny(), "thing", "teapot", &imgs, opts(40)).unwrap();
    let before = t.eval_loss(11, 16, true).unwrap();
    assert_eq!(
        t.eval_loss(11, 16, false).unwrap(),
        before,
        "Δ starts at zero"
    );
    let report = t.run(&Job::quiet()).unwrap();
    assert_eq!(report.steps_done, 40);
    assert!(!report.cancelled);
    let after = t.eval_loss(11, 16, false).unwrap();
    eprintln!("eval loss: Δ = 0 {before}, trained {after}");
    assert!(
        after < before * 0.99,
        "trained {after} vs untrained {before}"
    );
    let c = concept(&t).unwrap();
    assert_eq!(c.base_model.as_deref(), Some(tiny().unet_fingerprint()));
    assert_eq!(c.train["steps"], 40);
}

#[test]
fn runs_are_deterministic_and_resuming_continues_the_same_curve() {
    let imgs = images();
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(6);
    o.checkpoint_every = Some(3);
    o.checkpoint_dir = Some(dir.path().to_path_buf());
    let mut a = trainer(tiny(), "thing", "teapot", &imgs, o.clone()).unwrap();
    let ra = a.run(&Job::quiet()).unwrap();
    assert_eq!(ra.checkpoints.len(), 2);
    let mut b = trainer(tiny(), "thing", "teapot", &imgs, o).unwrap();
    let rb = b.run(&Job::quiet()).unwrap();
    assert_eq!(ra.losses, rb.losses);
    assert_eq!(
        deltas_diff(&concept(&a).unwrap(), &concept(&b).unwrap()),
        0.0
    );

    let checkpoint = infusion_repl::train::Checkpoint::read(&ra.checkpoints[0]).unwrap();
    let learner = Box::new(Deltas::new(tiny()).unwrap());
    let mut c = infusion_repl::train::Trainer::resume(
        tiny(),
        &checkpoint,
        &imgs,
        None,
        learner,
        &Job::quiet(),
    )
    .unwrap();
    assert_eq!(c.steps_done(), 3);
    let rc = c.run(&Job::quiet()).unwrap();
    assert_eq!(rc.losses, ra.losses[3..]);
    assert_eq!(
        deltas_diff(&concept(&a).unwrap(), &concept(&c).unwrap()),
        0.0
    );
    // The checkpoint is an ordinary concept file too.
    let ck = infusion_repl::Concept::load(&ra.checkpoints[1]).unwrap();
    assert_eq!(deltas_diff(&ck, &concept(&a).unwrap()), 0.0);
}

/// A step's batch through the model in slices (`micro_batch`) makes the update of the whole
/// batch: the losses and the Δs after three steps of batch 4 in passes of 1 and of 3 (a short
/// last slice) equal those of whole passes to float rounding (losses 1e-5 relative, Δs 1e-5
/// absolute; AdamW's first steps move each Δ element by about lr = 0.1), for Infusion alone and
/// for a LoRA with prior preservation (its class batch sliced alongside; see its bound below).
#[test]
fn a_batch_in_slices_makes_the_whole_batch_update() {
    let imgs = images();
    let run = |micro: Option<usize>| {
        let mut o = opts(3);
        o.micro_batch = micro;
        let mut t = trainer(tiny(), "thing", "teapot", &imgs, o).unwrap();
        assert_eq!(t.micro_batch(), micro.unwrap_or(4));
        let r = t.run(&Job::quiet()).unwrap();
        (r.losses, concept(&t).unwrap())
    };
    let (whole, c) = run(None);
    for micro in [1, 3] {
        let (losses, d) = run(Some(micro));
        for (a, b) in losses.iter().zip(&whole) {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs(),
                "passes of {micro}: loss {a} vs {b}"
            );
        }
        let diff = deltas_diff(&c, &d);
        assert!(diff <= 1e-5, "passes of {micro}: Δs differ by {diff}");
    }
    // Asked for the whole batch, the same run exactly.
    assert_eq!(deltas_diff(&c, &run(Some(4)).1), 0.0);

    let lora = |micro: Option<usize>| {
        let mut o = opts(2);
        o.lr = 0.01;
        o.micro_batch = micro;
        let learner = infusion_repl::methods::LoraLearner::new(tiny(), 4, "sks", 0).unwrap();
        let mut t = infusion_repl::train::Trainer::new(
            tiny(),
            "pot",
            "teapot",
            &imgs,
            o,
            Box::new(learner),
        )
        .unwrap();
        t.set_prior(&imgs[..2], 0.5).unwrap();
        let r = t.run(&Job::quiet()).unwrap();
        let vars: Vec<(String, candle_core::Tensor)> = t
            .vars()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        (r.losses, vars)
    };
    let (whole, a) = lora(None);
    let (sliced, b) = lora(Some(1));
    for (x, y) in sliced.iter().zip(&whole) {
        assert!((x - y).abs() <= 1e-5 * y.abs(), "LoRA loss {x} vs {y}");
    }
    // AdamW divides each gradient by its RMS + 1e-8: where a gradient is near 1e-8 (the tiny
    // model's self-attention keys), float rounding moves the factor by a part of a step, so
    // the LoRA's bound is 1% of one step (lr 0.01) rather than 1e-5.
    for ((k, x), (_, y)) in a.iter().zip(&b) {
        let diff = max_abs(&(x - y).unwrap());
        assert!(diff <= 1e-4, "LoRA factor {k} differs by {diff}");
    }
}

#[test]
fn cancelling_keeps_the_deltas_reached() {
    let imgs = images();
    let mut t = trainer(tiny(), "thing", "teapot", &imgs, opts(50)).unwrap();
    t.step().unwrap();
    t.step().unwrap();
    let job = Job::quiet();
    job.cancel();
    let r = t.run(&job).unwrap();
    assert!(r.cancelled);
    assert_eq!(r.steps_done, 2);
    let c = concept(&t).unwrap();
    assert!(c.deltas.values().any(|d| max_abs(d) > 0.0));
}

#[test]
fn a_non_finite_loss_stops_with_the_last_good_deltas() {
    let imgs = images();
    let mut o = opts(20);
    o.lr = 1e30;
    let mut t = trainer(tiny(), "thing", "teapot", &imgs, o).unwrap();
    let e = t.run(&Job::quiet()).unwrap_err();
    // Its own kind (issue 24): training diverged, not a bad argument.
    assert!(matches!(e, infusion_repl::Error::Diverged(_)), "{e:?}");
    assert!(
        e.to_string()
            .starts_with("training diverged: the loss became"),
        "{e}"
    );
    let c = concept(&t).unwrap();
    for d in c.deltas.values() {
        assert!(max_abs(d).is_finite());
    }
    // The optimizer is rolled back with the Δs: one AdamW update per step kept, and with every
    // update undone (the first step's Δ = 0) its moments are zero again.
    let dir = tempfile::tempdir().unwrap();
    let ck = t.save_checkpoint(dir.path()).unwrap();
    let optim = ck.with_extension("optim.safetensors");
    let bytes = std::fs::read(&optim).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = header.metadata().clone().unwrap();
    assert_eq!(meta["adam_step"], t.steps_done().to_string());
    if t.steps_done() == 0 {
        let moments = infusion_repl::sd::load_safetensors(&optim, &Device::Cpu).unwrap();
        assert!(moments.values().all(|m| max_abs(m) == 0.0));
    }
}

/// Without the copy before each update (parameters over `ROLLBACK_LIMIT_BYTES`, a whole UNet at
/// SD1.5 size), a run that diverges still stops with an error that says what it kept, and no
/// parameter is ever made non-finite: an update that would is refused whole.
#[test]
fn without_rollback_a_diverging_run_stops_and_says_what_it_kept() {
    let imgs = images();
    let mut o = opts(20);
    o.lr = 1e30;
    let mut t = trainer(tiny(), "thing", "teapot", &imgs, o).unwrap();
    t.set_rollback(false);
    let e = t.run(&Job::quiet()).unwrap_err().to_string();
    assert!(
        e.contains("would make parameters non-finite") || e.contains("too large to keep a copy"),
        "{e}"
    );
    let c = concept(&t).unwrap();
    for d in c.deltas.values() {
        assert!(max_abs(d).is_finite());
    }
}

/// Bad training options are refused with an error naming the option: templates without `{}`
/// ("templates"), a concept name with a space and `!` ("name"), a batch of 0 ("batch").
#[test]
fn bad_options_are_named() {
    let imgs = images();
    let mut o = opts(1);
    o.templates = vec!["a photo".into()];
    let e = trainer(tiny(), "thing", "teapot", &imgs, o).err().unwrap();
    assert!(e.to_string().contains("templates"), "{e}");
    let e = trainer(tiny(), "bad name!", "teapot", &imgs, opts(1))
        .err()
        .unwrap();
    assert!(e.to_string().contains("name"), "{e}");
    let mut o = opts(1);
    o.batch = 0;
    let e = trainer(tiny(), "thing", "teapot", &imgs, o).err().unwrap();
    assert!(e.to_string().contains("batch"), "{e}");
    let mut o = opts(1);
    o.micro_batch = Some(0);
    let e = trainer(tiny(), "thing", "teapot", &imgs, o).err().unwrap();
    assert!(e.to_string().contains("micro_batch"), "{e}");
}
