//! Loss masks (issue 22): a folder of one PNG per training image weighs each image's loss,
//! cropped and mirrored as the image and averaged to latent resolution; every method but
//! Custom Diffusion (whose scale augmentation masks the loss itself) takes them. Without masks
//! the loss is plain.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use infusion_repl::train::{mse, LossMask};
use infusion_repl::train::{Augment, TrainingSet};
use infusion_repl::util::{load_folder, load_masks};
use infusion_repl::Job;
use rand::SeedableRng;

use crate::common::{repo, tiny};

/// The example images in a folder, with a mask each: white on the left half, black on the
/// right.
fn folder_with_masks(dir: &Path) -> (PathBuf, PathBuf) {
    let images = dir.join("images");
    let masks = dir.join("masks");
    std::fs::create_dir_all(&images).unwrap();
    std::fs::create_dir_all(&masks).unwrap();
    for e in std::fs::read_dir(repo().join("assets/example-concept")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "png") {
            std::fs::copy(&p, images.join(p.file_name().unwrap())).unwrap();
            let (w, h) = image::image_dimensions(&p).unwrap();
            let m = image::GrayImage::from_fn(w, h, |x, _| {
                image::Luma([if x < w / 2 { 255 } else { 0 }])
            });
            m.save(masks.join(p.file_name().unwrap())).unwrap();
        }
    }
    (images, masks)
}

/// A left-half mask gives each image's draws a latent mask of ones on the left and zeros on
/// the right, its mirror image the opposite; the loss is the mean squared error over the
/// masked elements (checked by hand), against the plain mean without masks.
#[test]
fn masks_weigh_each_images_loss_as_its_crop_and_mirror() {
    let sd = tiny();
    let dir = tempfile::tempdir().unwrap();
    let (images, masks) = folder_with_masks(dir.path());
    let folder = load_folder(&images).unwrap();
    let m = load_masks(&folder.images, &masks).unwrap();
    let imgs: Vec<image::RgbImage> = folder.images.iter().map(|(_, i)| i.clone()).collect();
    let mut data = TrainingSet::new(
        sd,
        "teapot",
        &imgs,
        &["a photo of a {}".to_string()],
        true,
        Augment::None,
    )
    .unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let batch = data.draw(sd, &mut rng, 8).unwrap();
    assert!(
        data.masks(sd, &batch).unwrap().is_none(),
        "no masks: plain loss"
    );
    data.set_masks(sd, &m).unwrap();
    let LossMask { mask, per_channel } = data.masks(sd, &batch).unwrap().unwrap();
    assert!(per_channel);
    let (h, w) = (mask.dim(2).unwrap(), mask.dim(3).unwrap());
    for (i, d) in batch.draws.iter().enumerate() {
        let plane = mask
            .get(i)
            .unwrap()
            .get(0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let (left, right) = (plane[h / 2][0], plane[h / 2][w - 1]);
        // Images come each followed by its mirror image.
        let want = if d.image % 2 == 0 {
            (1.0, 0.0)
        } else {
            (0.0, 1.0)
        };
        assert_eq!((left, right), want, "draw {i} (image {})", d.image);
    }
    // The loss by hand: errors of 1 on the left half, 3 on the right.
    let b = batch.len();
    let ramp: Vec<f32> = (0..b * 4 * h * w)
        .map(|k| if k % w < w / 2 { 1.0 } else { 3.0 })
        .collect();
    let pred = Tensor::from_vec(ramp, (b, 4, h, w), &Device::Cpu).unwrap();
    let target = pred.zeros_like().unwrap();
    let m = LossMask {
        mask: mask.clone(),
        per_channel: true,
    };
    let got = mse(&pred, &target, Some(&m))
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    // Per draw: the mask-weighted mean of the squared errors (1 left, 9 right), by hand.
    let mut want = 0f32;
    for i in 0..b {
        let plane = mask
            .get(i)
            .unwrap()
            .get(0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let (mut num, mut den) = (0f32, 0f32);
        for row in &plane {
            for (c, m) in row.iter().enumerate() {
                num += m * if c < w / 2 { 1.0 } else { 9.0 };
                den += m;
            }
        }
        want += num / den / b as f32;
    }
    assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    let plain = mse(&pred, &target, None)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!((plain - 5.0).abs() < 1e-5, "{plain}");
}

/// A missing mask, one of another size and an all-black one are errors naming the file; Custom
/// Diffusion refuses masks; a Perfusion run with masks trains and its checkpoint keeps them.
#[test]
fn masks_are_checked_and_kept_by_checkpoints() {
    use infusion_repl::actions::{train_concept, TrainAsk};
    let dir = tempfile::tempdir().unwrap();
    let (images, masks) = folder_with_masks(dir.path());
    let folder = load_folder(&images).unwrap();
    let first = folder.images[0].0.file_name().unwrap().to_owned();
    let broken = dir.path().join("broken");
    std::fs::create_dir(&broken).unwrap();
    for (p, _) in &folder.images[1..] {
        std::fs::copy(
            masks.join(p.file_name().unwrap()),
            broken.join(p.file_name().unwrap()),
        )
        .unwrap();
    }
    let e = load_masks(&folder.images, &broken).unwrap_err().to_string();
    assert!(
        e.contains("no mask") && e.contains(&*first.to_string_lossy()),
        "{e}"
    );
    image::GrayImage::from_pixel(5, 5, image::Luma([255]))
        .save(broken.join(&first))
        .unwrap();
    let e = load_masks(&folder.images, &broken).unwrap_err().to_string();
    assert!(e.contains("a 5x5 mask"), "{e}");
    let (w, h) = folder.images[0].1.dimensions();
    image::GrayImage::new(w, h)
        .save(broken.join(&first))
        .unwrap();
    let e = load_masks(&folder.images, &broken).unwrap_err().to_string();
    assert!(e.contains("all black"), "{e}");

    let sd = tiny();
    let job = Job::quiet();
    let ask = |method: &str| TrainAsk {
        folder: images.clone(),
        name: "pot".into(),
        word: "teapot".into(),
        method: Some(method.into()),
        steps: Some(1),
        masks: Some(masks.clone()),
        checkpoint_every: Some(1),
        checkpoint_dir: Some(dir.path().join(format!("ck-{method}"))),
        out: Some(dir.path().join(format!("{method}.out"))),
        settings: [("accumulate".to_string(), serde_json::json!(1))]
            .into_iter()
            .filter(|_| method == "perfusion")
            .collect(),
        ..Default::default()
    };
    let e = train_concept(sd, &ask("custom_diffusion").resolve().unwrap(), &job)
        .unwrap_err()
        .to_string();
    assert!(e.contains("takes no masks"), "{e}");
    let masked = train_concept(sd, &ask("perfusion").resolve().unwrap(), &job).unwrap();
    let ck = infusion_repl::train::Checkpoint::read(&masked.checkpoints[0]).unwrap();
    assert_eq!(ck.options.masks.as_deref(), Some(masks.as_path()));
    let mut plain = ask("perfusion");
    plain.masks = None;
    plain.checkpoint_every = None;
    let plain = train_concept(sd, &plain.resolve().unwrap(), &job).unwrap();
    assert!(
        (masked.losses[0] - plain.losses[0]).abs() > 1e-6,
        "the masks must change the loss ({} vs {})",
        masked.losses[0],
        plain.losses[0]
    );
}
