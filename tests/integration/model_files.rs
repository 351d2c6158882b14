//! The model files users have: a tokenizer saved as `tokenizer.json` only, a text encoder saved
//! without `text_model.`, a single-file checkpoint of the original (LDM) layout (f32, fp16, with
//! an EMA copy), another VAE, and clear refusals of checkpoints that are not SD1.x.
//!
//! References: `tests/fixtures/model_files/` (made by `tools/make_model_file_fixtures.py` with
//! transformers 5.17 / diffusers 0.42.1): `tokenizer-json/` as transformers 5 saves the tiny
//! tokenizer, and `ldm_keys.json`, the single-file key of every tensor of the tiny model,
//! certified by diffusers' own single-file converters and by `from_single_file` reproducing the
//! folder pipeline's latents. Here the single file is built from the bundled folder with that map;
//! it holds the folder's weights, so the same model must come out: same latents bit for bit
//! (tolerance 0) and the same fingerprint.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use infusion_repl::actions::{load_model, ModelRequest};
use infusion_repl::sd::Kernels;
use infusion_repl::{GenerateOptions, Job, LoadOptions, StableDiffusion};

use crate::common::{copy_dir, repo, tiny, tiny_model_dir};

type Tensors = HashMap<String, Tensor>;

fn fixtures() -> PathBuf {
    repo().join("tests/fixtures/model_files")
}

fn read(path: &Path) -> Tensors {
    infusion_repl::sd::load_safetensors(path, &Device::Cpu).unwrap()
}

/// The tiny model's tensors per component: (component, its weights file).
fn components() -> [(&'static str, &'static str); 3] {
    [
        ("unet", "unet/diffusion_pytorch_model.safetensors"),
        ("vae", "vae/diffusion_pytorch_model.safetensors"),
        ("text_encoder", "text_encoder/model.safetensors"),
    ]
}

/// The tiny model as one file of the original layout (keys and 1x1 kernels as `ldm_keys.json`
/// says), tensors stored in `dtype`, with `edit` applied last.
pub(crate) fn single_file(
    dir: &Path,
    name: &str,
    dtype: DType,
    edit: impl FnOnce(&mut Tensors),
) -> PathBuf {
    let map: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("ldm_keys.json")).unwrap())
            .unwrap();
    let conv_1x1: Vec<&str> = map["conv_1x1"]["vae"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let mut out = Tensors::new();
    for (component, file) in components() {
        let keys = &map["keys"][component];
        for (name, t) in read(&tiny_model_dir().join(file)) {
            let key = keys[&name]
                .as_str()
                .unwrap_or_else(|| panic!("{component} tensor {name} not in ldm_keys.json"));
            let t = if component == "vae" && conv_1x1.contains(&name.as_str()) {
                let (a, b) = t.dims2().unwrap();
                t.reshape((a, b, 1, 1)).unwrap()
            } else {
                t
            };
            out.insert(key.to_string(), t.to_dtype(dtype).unwrap());
        }
    }
    edit(&mut out);
    let path = dir.join(name);
    candle_core::safetensors::save(&out, &path).unwrap();
    path
}

fn tiny_config() -> LoadOptions {
    LoadOptions {
        config: Some(tiny_model_dir()),
        vocabulary: Some(tiny_model_dir().join("tokenizer")),
        ..LoadOptions::default()
    }
}

fn generate(sd: &StableDiffusion) -> infusion_repl::Generation {
    let opts = GenerateOptions {
        steps: 3,
        guidance: 7.5,
        seed: 7,
        ..GenerateOptions::default()
    };
    sd.generate("a photo of a cat", &opts, &Job::quiet())
        .unwrap()
}

/// max|a - b|.
fn diff(a: &Tensor, b: &Tensor) -> f32 {
    crate::common::max_abs(&(a - b).unwrap())
}

fn load_err(path: &Path, opts: &LoadOptions) -> String {
    match StableDiffusion::load(path.to_str().unwrap(), opts) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e.to_string(),
    }
}

/// Every tensor times `f` (another model of the same shapes).
fn scaled(t: &mut Tensors, prefix: &str, f: f64) {
    for (k, v) in t.iter_mut() {
        if k.starts_with(prefix) {
            *v = (&*v * f).unwrap();
        }
    }
}

#[test]
fn a_tokenizer_json_alone_tokenizes_like_transformers() {
    let dir = fixtures().join("tokenizer-json");
    assert!(!dir.join("vocab.json").exists() && dir.join("tokenizer.json").is_file());
    let tok = infusion_repl::sd::ClipTokenizer::from_dir(&dir, 77).unwrap();
    let cases: Vec<serde_json::Value> = serde_json::from_str(
        &std::fs::read_to_string(repo().join("tests/fixtures/reference/tokens.json")).unwrap(),
    )
    .unwrap();
    assert!(cases.len() >= 5);
    for case in &cases {
        let prompt = case["prompt"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tok.encode(prompt).unwrap().ids, want, "prompt {prompt:?}");
    }

    // A folder as diffusers 0.42 saves it (tokenizer.json only) is the same model.
    let model = tempfile::tempdir().unwrap();
    copy_dir(&tiny_model_dir(), model.path());
    std::fs::remove_dir_all(model.path().join("tokenizer")).unwrap();
    copy_dir(&dir, &model.path().join("tokenizer"));
    let sd = StableDiffusion::load_dir(model.path(), &LoadOptions::default()).unwrap();
    assert_eq!(diff(&generate(&sd).latents, &generate(tiny()).latents), 0.0);
}

#[test]
fn a_text_encoder_saved_without_text_model_loads_the_same() {
    let model = tempfile::tempdir().unwrap();
    copy_dir(&tiny_model_dir(), model.path());
    let file = model.path().join("text_encoder/model.safetensors");
    let bare: Tensors = read(&file)
        .into_iter()
        .map(|(k, v)| (k.strip_prefix("text_model.").unwrap().to_string(), v))
        .collect();
    candle_core::safetensors::save(&bare, &file).unwrap();
    let sd = StableDiffusion::load_dir(model.path(), &LoadOptions::default()).unwrap();
    assert_eq!(diff(&generate(&sd).latents, &generate(tiny()).latents), 0.0);
}

#[test]
fn a_single_file_checkpoint_is_its_folder() {
    let dir = tempfile::tempdir().unwrap();
    let path = single_file(dir.path(), "tiny-sd.safetensors", DType::F32, |_| {});
    let sd = StableDiffusion::load(path.to_str().unwrap(), &tiny_config()).unwrap();
    let (a, b) = (generate(&sd), generate(tiny()));
    assert_eq!(diff(&a.latents, &b.latents), 0.0, "latents");
    assert_eq!(diff(&a.image, &b.image), 0.0, "decoded image");
    // Concepts trained on the folder belong to the file, and the other way round.
    assert_eq!(sd.unet_fingerprint(), tiny().unet_fingerprint());
    assert_eq!(sd.name(), "tiny-sd");
    assert!(sd.notes().is_empty(), "{:?}", sd.notes());
    // The file has no tokenizer: the library is told where the vocabulary is (the command line
    // and scripts give the bundled one), not left to find it.
    let e = load_err(
        &path,
        &LoadOptions {
            vocabulary: None,
            ..tiny_config()
        },
    );
    assert!(
        e.contains("vocabulary") && e.contains("tiny-sd.safetensors") && e.contains("no tokenizer"),
        "{e}"
    );

    // Stored in fp16 (as most shared checkpoints are), run in f32: the weights' rounding only
    // (f16 keeps 11 bits: 1e-3 relative per weight; 3 steps of CFG 7.5 amplify it).
    let half = single_file(dir.path(), "tiny-sd-fp16.safetensors", DType::F16, |_| {});
    let sd = StableDiffusion::load(half.to_str().unwrap(), &tiny_config()).unwrap();
    crate::common::assert_close(&generate(&sd).latents, &b.latents, 2e-2, "fp16 file");
    assert_eq!(sd.unet_fingerprint(), tiny().unet_fingerprint());
}

#[test]
fn the_ema_copy_is_preferred_and_said_and_the_plain_weights_can_be_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    // The EMA copy is another model (the UNet scaled by 1.05), named as the original training
    // code and diffusers name it: `model_ema.diffusion_model` + the key without its dots.
    let ema_of = |t: &mut Tensors, keep_plain: bool| {
        let unet: Vec<(String, Tensor)> = t
            .iter()
            .filter(|(k, _)| k.starts_with("model.diffusion_model."))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (k, v) in unet {
            let flat = k.strip_prefix("model.").unwrap().replace('.', "");
            t.insert(format!("model_ema.{flat}"), (v * 1.05).unwrap());
            if !keep_plain {
                t.remove(&k);
            }
        }
    };
    let both = single_file(dir.path(), "both.safetensors", DType::F32, |t| {
        ema_of(t, true)
    });
    let only = single_file(dir.path(), "ema-only.safetensors", DType::F32, |t| {
        ema_of(t, false)
    });
    // The reference for the EMA copy: the same scaled UNet as the plain weights of a file.
    let scaled_file = single_file(dir.path(), "scaled.safetensors", DType::F32, |t| {
        scaled(t, "model.diffusion_model.", 1.05)
    });
    let opts = |ema| LoadOptions {
        ema,
        ..tiny_config()
    };
    let load =
        |path: &Path, ema| StableDiffusion::load(path.to_str().unwrap(), &opts(ema)).unwrap();
    let base = generate(tiny()).latents;
    let ema = generate(&load(&scaled_file, None)).latents;
    assert!(diff(&ema, &base) > 1e-3, "the EMA copy is another model");

    for (sd, note) in [
        (load(&both, None), "using the EMA ones"),
        (load(&both, Some(true)), "using the EMA ones"),
        (load(&only, None), "uses the EMA weights"),
    ] {
        assert_eq!(diff(&generate(&sd).latents, &ema), 0.0);
        assert!(
            sd.notes().iter().any(|n| n.contains(note)),
            "{:?}",
            sd.notes()
        );
    }
    let plain = load(&both, Some(false));
    assert_eq!(diff(&generate(&plain).latents, &base), 0.0);
    assert!(plain
        .notes()
        .iter()
        .any(|n| n.contains("using the plain ones")));

    let e = load_err(&scaled_file, &opts(Some(true)));
    assert!(e.contains("ema") && e.contains("holds no EMA"), "{e}");
    let e = load_err(&only, &opts(Some(false)));
    assert!(e.contains("ema") && e.contains("holds no plain"), "{e}");
}

#[test]
fn checkpoints_that_are_not_sd1_are_refused_by_what_they_are() {
    let dir = tempfile::tempdir().unwrap();
    type Case = (&'static str, fn(&mut Tensors), &'static str);
    let cases: [Case; 4] = [
        (
            "sdxl.safetensors",
            |t| {
                let v = t.values().next().unwrap().clone();
                t.insert("conditioner.embedders.0.transformer.text_model.x".into(), v);
            },
            "an SDXL checkpoint",
        ),
        (
            "sd2.safetensors",
            |t| {
                t.retain(|k, _| !k.starts_with("cond_stage_model."));
                let v = t.values().next().unwrap().clone();
                t.insert("cond_stage_model.model.transformer.resblocks.0.x".into(), v);
            },
            "Stable Diffusion 2.x",
        ),
        (
            "inpainting.safetensors",
            |t| {
                let k = "model.diffusion_model.input_blocks.0.0.weight";
                let (o, _, h, w) = t[k].dims4().unwrap();
                t.insert(
                    k.into(),
                    Tensor::zeros((o, 9, h, w), DType::F32, &Device::Cpu).unwrap(),
                );
            },
            "takes 9 channels",
        ),
        (
            "vae-only.safetensors",
            |t| t.retain(|k, _| k.starts_with("first_stage_model.")),
            "not a Stable Diffusion checkpoint",
        ),
    ];
    for (name, edit, what) in cases {
        let path = single_file(dir.path(), name, DType::F32, edit);
        let e = load_err(&path, &tiny_config());
        assert!(e.contains(what) && e.contains(name), "{name}: {e}");
    }
    // Pickles are never opened.
    let ckpt = dir.path().join("model.ckpt");
    std::fs::write(&ckpt, b"not read").unwrap();
    let e = load_err(&ckpt, &LoadOptions::default());
    assert!(
        e.contains("pickled") && e.contains("model.ckpt") && e.contains("safetensors"),
        "{e}"
    );
}

#[test]
fn a_single_file_of_other_shapes_asks_for_its_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = single_file(dir.path(), "tiny-sd.safetensors", DType::F32, |_| {});
    // Without `config` the file is read with SD1.5's configs, which the tiny shapes do not fit.
    let e = load_err(
        &path,
        &LoadOptions {
            config: None,
            ..tiny_config()
        },
    );
    assert!(
        e.contains("tiny-sd.safetensors") && e.contains("--config"),
        "{e}"
    );
    assert!(
        e.lines().count() < 16,
        "a short error, not every tensor:\n{e}"
    );
    // A tensor missing from a single file is named as the file names it.
    let cut = single_file(dir.path(), "cut.safetensors", DType::F32, |t| {
        t.retain(|k, _| !k.starts_with("model.diffusion_model.input_blocks.1."))
    });
    let e = load_err(&cut, &tiny_config());
    assert!(
        e.contains("tensor `model.diffusion_model.input_blocks.1.0.in_layers.0.weight` is missing"),
        "{e}"
    );
    // `config` is for single files; `ema` too.
    let e = load_err(&tiny_model_dir(), &tiny_config());
    assert!(
        e.contains("config") && e.contains("diffusers folder"),
        "{e}"
    );
}

#[test]
fn another_vae_from_a_folder_or_a_file_of_either_layout() {
    let dir = tempfile::tempdir().unwrap();
    // The other VAE: the tiny one scaled by 0.9, as a diffusers folder ...
    let vae_dir = dir.path().join("other-vae");
    copy_dir(&tiny_model_dir().join("vae"), &vae_dir);
    let file = vae_dir.join("diffusion_pytorch_model.safetensors");
    let mut t = read(&file);
    scaled(&mut t, "", 0.9);
    candle_core::safetensors::save(&t, &file).unwrap();
    // ... and as the model folder it belongs to (the reference) ...
    let model = dir.path().join("model");
    copy_dir(&tiny_model_dir(), &model);
    std::fs::copy(&file, model.join("vae/diffusion_pytorch_model.safetensors")).unwrap();
    let want = generate(&StableDiffusion::load_dir(&model, &LoadOptions::default()).unwrap());
    let base = generate(tiny());
    assert_eq!(
        diff(&want.latents, &base.latents),
        0.0,
        "the VAE only decodes"
    );
    assert!(
        diff(&want.image, &base.image) > 1e-3,
        "the other VAE decodes otherwise"
    );
    // ... and as files: diffusers names, and the original layout bare (a `vae-ft-mse` style
    // file) or under `first_stage_model.`.
    let ldm = single_file(dir.path(), "ldm.safetensors", DType::F32, |t| {
        t.retain(|k, _| k.starts_with("first_stage_model."));
        scaled(t, "", 0.9);
    });
    let bare: Tensors = read(&ldm)
        .into_iter()
        .map(|(k, v)| (k.strip_prefix("first_stage_model.").unwrap().to_string(), v))
        .collect();
    let bare_path = dir.path().join("vae-ft.safetensors");
    candle_core::safetensors::save(&bare, &bare_path).unwrap();
    for vae in [vae_dir, file, ldm, bare_path] {
        let opts = LoadOptions {
            vae: Some(vae.clone()),
            ..LoadOptions::default()
        };
        let sd = StableDiffusion::load_dir(&tiny_model_dir(), &opts).unwrap();
        assert_eq!(
            diff(&generate(&sd).image, &want.image),
            0.0,
            "{}",
            vae.display()
        );
        assert!(sd.notes().iter().any(|n| n.contains("VAE comes from")));
    }
}

#[test]
fn the_command_line_and_scripts_load_single_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = single_file(dir.path(), "tiny-sd.safetensors", DType::F32, |_| {});
    let out = dir.path().join("cat.png");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_infusion-repl"))
        .args(["generate", "a photo of a cat", "--steps", "1", "--model"])
        .arg(&path)
        .arg("--config")
        .arg(tiny_model_dir())
        .arg("--out")
        .arg(&out)
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.is_file());
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_infusion-repl"))
        .args(["generate", "a cat", "--steps", "1", "--no-ema"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("ema") && err.contains("single-file"),
        "{err}"
    );

    // The library call the script binding makes, with a collecting job to see its notes.
    let job = Job::collecting();
    let req = ModelRequest {
        model: Some(path.display().to_string()),
        device: "cpu".into(),
        dtype: "f32".into(),
        config: Some(tiny_model_dir().display().to_string()),
        vae: Some(tiny_model_dir().join("vae").display().to_string()),
        ema: None,
        kernels: Kernels::Naive,
    };
    let loaded = load_model(&req, &job).unwrap();
    assert_eq!(loaded.sd.unet_fingerprint(), tiny().unet_fingerprint());
    assert!(job
        .messages()
        .iter()
        .any(|m| m.starts_with("note: the VAE comes from")));
}

#[test]
fn sd15_names_and_shapes_are_those_of_diffusers_and_its_conversion_script() {
    use infusion_repl::sd::tensors_asked;
    use infusion_repl::sd::ModelConfigs;
    use infusion_repl::sd::{ldm_unet_key, ldm_vae_key, TEXT, UNET, VAE};
    use infusion_repl::sd::{TextEncoder, UNet, Vae};

    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("sd15_ldm_keys.json")).unwrap(),
    )
    .unwrap();
    let c = ModelConfigs::sd15();
    let asked = |build: &dyn Fn(candle_nn::VarBuilder) -> candle_core::Result<()>| {
        tensors_asked(build).unwrap()
    };
    let components = [
        (
            "unet",
            asked(&|vb| {
                UNet::new(vb, &c.unet, Kernels::Naive)
                    .map(drop)
                    .map_err(candle_core::Error::wrap)
            }),
        ),
        (
            "vae",
            asked(&|vb| {
                Vae::new(vb, &c.vae, Kernels::Naive)
                    .map(drop)
                    .map_err(candle_core::Error::wrap)
            }),
        ),
        (
            "text_encoder",
            asked(&|vb| TextEncoder::new(vb, &c.text).map(drop)),
        ),
    ];
    for (component, ours) in components {
        let want = json["keys"][component].as_object().unwrap();
        let mut names: Vec<&str> = ours.iter().map(|(n, _)| n.as_str()).collect();
        names.sort();
        names.dedup();
        let mut theirs: Vec<&str> = want.keys().map(String::as_str).collect();
        theirs.sort();
        assert_eq!(names, theirs, "{component}: the tensors of SD1.5");
        for (name, shape) in &ours {
            let (key, their_shape) = (&want[name][0], &want[name][1]);
            assert_eq!(serde_json::json!(shape), *their_shape, "{component} {name}");
            let key_ours = match component {
                "unet" => format!("{UNET}{}", ldm_unet_key(name, &c.unet)),
                "vae" => format!("{VAE}{}", ldm_vae_key(name, &c.vae)),
                _ => format!("{TEXT}{name}"),
            };
            assert_eq!(key_ours, key.as_str().unwrap(), "{component} {name}");
        }
    }
}

#[test]
fn a_pickled_component_is_refused_in_one_line_with_how_to_convert() {
    let model = tempfile::tempdir().unwrap();
    copy_dir(&tiny_model_dir(), model.path());
    // What transformers 4 saved without safetensors.
    std::fs::remove_file(model.path().join("text_encoder/model.safetensors")).unwrap();
    std::fs::write(
        model.path().join("text_encoder/pytorch_model.bin"),
        b"not read",
    )
    .unwrap();
    let e = match StableDiffusion::load_dir(model.path(), &LoadOptions::default()) {
        Ok(_) => panic!("loaded"),
        Err(e) => e.to_string(),
    };
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(
        e.contains("pytorch_model.bin")
            && e.contains("never unpickled")
            && e.contains("save_pretrained"),
        "{e}"
    );
}

#[test]
fn sharded_weights_load_from_their_index() {
    let model = tempfile::tempdir().unwrap();
    copy_dir(&tiny_model_dir(), model.path());
    // The UNet in two shards, as `save_pretrained(max_shard_size=...)` writes them.
    let unet = model.path().join("unet");
    let file = unet.join("diffusion_pytorch_model.safetensors");
    let mut names: Vec<(String, Tensor)> = read(&file).into_iter().collect();
    names.sort_by(|a, b| a.0.cmp(&b.0));
    let half = names.len() / 2;
    let mut weight_map = serde_json::Map::new();
    for (i, part) in [&names[..half], &names[half..]].into_iter().enumerate() {
        let shard = format!("diffusion_pytorch_model-0000{}-of-00002.safetensors", i + 1);
        let tensors: Tensors = part.iter().cloned().collect();
        candle_core::safetensors::save(&tensors, unet.join(&shard)).unwrap();
        for (k, _) in part {
            weight_map.insert(k.clone(), shard.clone().into());
        }
    }
    std::fs::remove_file(&file).unwrap();
    std::fs::write(
        unet.join("diffusion_pytorch_model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": weight_map}).to_string(),
    )
    .unwrap();
    let sd = StableDiffusion::load_dir(model.path(), &LoadOptions::default()).unwrap();
    assert_eq!(diff(&generate(&sd).latents, &generate(tiny()).latents), 0.0);
    assert_eq!(sd.unet_fingerprint(), tiny().unet_fingerprint());
}
