//! 5-step text-to-image parity (reference/txt2img.safetensors): every step's guided eps and
//! latents, the final latents and the image, tolerance 1e-3 relative (5 DDIM steps with CFG 7.5
//! amplify per-step error, see tests/fixtures/README.md).

use candle_core::Tensor;
use infusion_repl::sd::Denoise;
use infusion_repl::{GenerateOptions, Job};

use crate::common::{assert_close, get, reference, tiny};

pub(crate) fn options(r: &std::collections::HashMap<String, Tensor>) -> GenerateOptions {
    GenerateOptions {
        steps: 5,
        guidance: 7.5,
        noise: Some(get(r, "init_noise").clone()),
        ..Default::default()
    }
}

#[test]
fn trajectory_and_image_match_reference() {
    let r = reference("txt2img.safetensors");
    let sd = tiny();
    let prompt = "a photo of a cat sitting by a teapot";
    let opts = options(&r);
    let tokens = sd.tokenize(prompt).unwrap();
    let neg = sd.tokenize("").unwrap();
    let ids: Vec<i64> = neg
        .ids
        .iter()
        .chain(&tokens.ids)
        .map(|&i| i as i64)
        .collect();
    assert_eq!(
        ids,
        get(&r, "ids")
            .flatten_all()
            .unwrap()
            .to_vec1::<i64>()
            .unwrap()
    );

    let states = sd.text_states(&[&neg, &tokens]).unwrap();
    assert_close(
        &states,
        get(&r, "encoder_hidden_states"),
        1e-4,
        "text states",
    );
    let init = sd.initial_latents(&opts).unwrap();
    let traj = infusion_repl::sd::Trajectory {
        branch: infusion_repl::Branch::MAIN,
        sample: 0,
        uncond: states.get(0).unwrap().unsqueeze(0).unwrap(),
        cond: states.get(1).unwrap().unsqueeze(0).unwrap(),
    };
    let mut eps_steps = vec![];
    let mut lat_steps = vec![];
    let mut timesteps = vec![];
    let fin = sd
        .denoise(
            &Denoise::new(&init, &[traj], &opts),
            &Job::quiet(),
            &mut |rep| {
                timesteps.push(rep.step.timestep as i64);
                eps_steps.push(rep.guided_eps[0].clone());
                lat_steps.push(rep.latents[0].clone());
                Ok(())
            },
        )
        .unwrap()
        .remove(0);
    assert_eq!(timesteps, get(&r, "timesteps").to_vec1::<i64>().unwrap());
    let eps = Tensor::cat(&eps_steps, 0).unwrap();
    let lat = Tensor::cat(&lat_steps, 0).unwrap();
    assert_close(
        &eps,
        get(&r, "guided_eps_steps"),
        1e-3,
        "guided eps per step",
    );
    assert_close(&lat, get(&r, "latents_steps"), 1e-3, "latents per step");
    assert_close(&fin, get(&r, "final_latents"), 1e-3, "final latents");
    let image = sd.decode(&fin).unwrap();
    assert_close(&image, get(&r, "image"), 1e-3, "image");
}

#[test]
fn generate_api_reproduces_reference_image() {
    let r = reference("txt2img.safetensors");
    let g = tiny()
        .generate(
            "a photo of a cat sitting by a teapot",
            &options(&r),
            &Job::quiet(),
        )
        .unwrap();
    assert_close(&g.latents, get(&r, "final_latents"), 1e-3, "final latents");
    assert_close(&g.image, get(&r, "image_01"), 1e-3, "image in [0, 1]");
    assert_eq!(g.timesteps, vec![801.0, 601.0, 401.0, 201.0, 1.0]);
}

#[test]
fn png_has_the_image_and_the_settings() {
    let r = reference("txt2img.safetensors");
    // A prompt without concepts: the plain image, one PNG.
    let g = infusion_repl::generate_pair(
        tiny(),
        &infusion_repl::ConceptSet::new(),
        "a photo of a cat sitting by a teapot",
        &infusion_repl::PairOptions {
            generate: options(&r),
            replace_steps: 1.0,
        },
        None,
        &Job::quiet(),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.png");
    assert_eq!(g.save(&path).unwrap(), vec![path.clone()]);
    let img = image::open(&path).unwrap().to_rgb8();
    assert_eq!((img.width(), img.height()), (32, 32));
    // Pixels equal the reference image in [0, 1] rounded to 8 bits (at most one level off,
    // for values that sit on a rounding boundary).
    let expected = get(&r, "image_01")
        .squeeze(0)
        .unwrap()
        .permute((1, 2, 0))
        .unwrap();
    let expected: Vec<f32> = expected.flatten_all().unwrap().to_vec1().unwrap();
    for (i, (&p, &e)) in img.as_raw().iter().zip(&expected).enumerate() {
        let e = (e * 255.0).round();
        assert!((p as f32 - e).abs() <= 1.0, "pixel value {i}: {p} vs {e}");
    }
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&path).unwrap()));
    let reader = decoder.read_info().unwrap();
    let text: Vec<(String, String)> = reader
        .info()
        .uncompressed_latin1_text
        .iter()
        .map(|t| (t.keyword.clone(), t.text.clone()))
        .collect();
    assert!(text.contains(&(
        "prompt".into(),
        "a photo of a cat sitting by a teapot".into()
    )));
    assert!(text.contains(&("steps".into(), "5".into())));
    // Nothing else is left in the folder (the write went through a temporary file).
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn seeded_noise_is_deterministic_and_seed_dependent() {
    let sd = tiny();
    let a = sd
        .initial_latents(&GenerateOptions {
            seed: 7,
            ..Default::default()
        })
        .unwrap();
    let b = sd
        .initial_latents(&GenerateOptions {
            seed: 7,
            ..Default::default()
        })
        .unwrap();
    let c = sd
        .initial_latents(&GenerateOptions {
            seed: 8,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(a.dims(), [1, 4, 16, 16]);
    let diff = |x: &Tensor, y: &Tensor| crate::common::max_abs(&(x - y).unwrap());
    assert_eq!(diff(&a, &b), 0.0);
    assert!(diff(&a, &c) > 0.1);
}

#[test]
fn bad_sizes_and_noise_are_errors() {
    let sd = tiny();
    let e = sd
        .initial_latents(&GenerateOptions {
            width: Some(33),
            ..Default::default()
        })
        .unwrap_err();
    assert!(e.to_string().contains("width"), "{e}");
    let noise = Tensor::zeros(
        (1, 4, 8, 8),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let e = sd
        .initial_latents(&GenerateOptions {
            noise: Some(noise),
            ..Default::default()
        })
        .unwrap_err();
    assert!(
        e.to_string().contains("noise") && e.to_string().contains("[1, 4, 16, 16]"),
        "{e}"
    );
}
