//! Loading what users have, and clear errors for what is broken: a missing tensor, a wrong shape
//! and a truncated file each name the culprit.

use std::path::Path;

use infusion_repl::{LoadOptions, StableDiffusion};

use crate::common::{copy_dir, tiny_model_dir};

fn load_err(dir: &Path) -> String {
    match StableDiffusion::load_dir(dir, &LoadOptions::default()) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

/// Rewrites the UNet file of a copy of the tiny model with `edit` applied to its tensors.
fn with_edited_unet(
    edit: impl FnOnce(&mut std::collections::HashMap<String, candle_core::Tensor>),
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&tiny_model_dir(), dir.path());
    let file = dir.path().join("unet/diffusion_pytorch_model.safetensors");
    let mut t = infusion_repl::sd::load_safetensors(&file, &candle_core::Device::Cpu).unwrap();
    edit(&mut t);
    candle_core::safetensors::save(&t, &file).unwrap();
    dir
}

#[test]
fn missing_tensor_is_named() {
    let name = "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_v.weight";
    let dir = with_edited_unet(|t| {
        t.remove(name).unwrap();
    });
    let e = load_err(dir.path());
    assert!(e.contains(name) && e.contains("missing"), "{e}");
    assert!(e.contains("expected shape [32, 32]"), "{e}");
    assert!(e.contains("diffusion_pytorch_model.safetensors"), "{e}");
}

#[test]
fn wrong_shape_names_tensor_file_and_both_shapes() {
    let name = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight";
    let dir = with_edited_unet(|t| {
        let bad = candle_core::Tensor::zeros(
            (64, 31),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        t.insert(name.to_string(), bad);
    });
    let e = load_err(dir.path());
    assert!(e.contains(name), "{e}");
    assert!(
        e.contains("[64, 31]") && e.contains("expected [64, 32]"),
        "{e}"
    );
    assert!(
        e.contains("unet/diffusion_pytorch_model.safetensors"),
        "{e}"
    );
}

#[test]
fn all_problems_are_listed_at_once() {
    let dir = with_edited_unet(|t| {
        t.remove("conv_in.weight").unwrap();
        t.remove("conv_out.bias").unwrap();
    });
    let e = load_err(dir.path());
    assert!(
        e.contains("`conv_in.weight`") && e.contains("`conv_out.bias`"),
        "{e}"
    );
}

#[test]
fn truncated_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&tiny_model_dir(), dir.path());
    let file = dir.path().join("vae/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("vae/diffusion_pytorch_model.safetensors"), "{e}");
    assert!(e.contains("not a valid safetensors file"), "{e}");
}

#[test]
fn garbage_header_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&tiny_model_dir(), dir.path());
    let file = dir.path().join("text_encoder/model.safetensors");
    std::fs::write(&file, b"\xff\xff\xff\xff\xff\xff\xff\x7fnot json").unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("text_encoder/model.safetensors"), "{e}");
}

#[test]
fn missing_component_and_bad_config_are_named() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&tiny_model_dir(), dir.path());
    std::fs::remove_dir_all(dir.path().join("vae")).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("vae/"), "{e}");

    let dir = tempfile::tempdir().unwrap();
    copy_dir(&tiny_model_dir(), dir.path());
    let cfg = dir.path().join("unet/config.json");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("\"DownBlock2D\"", "\"KDownBlock2D\"")).unwrap();
    let e = load_err(dir.path());
    assert!(
        e.contains("unet/config.json") && e.contains("KDownBlock2D"),
        "{e}"
    );
}

#[test]
fn old_vae_attention_names_load_the_same_model() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&tiny_model_dir(), dir.path());
    let file = dir.path().join("vae/diffusion_pytorch_model.safetensors");
    let t = infusion_repl::sd::load_safetensors(&file, &candle_core::Device::Cpu).unwrap();
    let renamed: std::collections::HashMap<String, candle_core::Tensor> = t
        .into_iter()
        .map(|(k, v)| {
            let k = k
                .replace(".to_q.", ".query.")
                .replace(".to_k.", ".key.")
                .replace(".to_v.", ".value.")
                .replace(".to_out.0.", ".proj_attn.");
            (k, v)
        })
        .collect();
    assert!(renamed.keys().any(|k| k.contains("proj_attn")));
    candle_core::safetensors::save(&renamed, &file).unwrap();
    let sd = StableDiffusion::load_dir(dir.path(), &LoadOptions::default()).unwrap();
    let r = crate::common::reference("vae.safetensors");
    let image = sd.decode(crate::common::get(&r, "decode.latents")).unwrap();
    crate::common::assert_close(
        &image,
        crate::common::get(&r, "decode.image"),
        1e-4,
        "VAE decode, old names",
    );
}

#[test]
fn fp16_variant_is_preferred_when_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&tiny_model_dir(), dir.path());
    // An fp16 variant that is broken: loading with f16 must pick it (and fail naming it), loading
    // with f32 must not touch it.
    let bad = dir
        .path()
        .join("unet/diffusion_pytorch_model.fp16.safetensors");
    std::fs::write(&bad, b"broken").unwrap();
    StableDiffusion::load_dir(dir.path(), &LoadOptions::default()).unwrap();
    let files = infusion_repl::sd::ModelFiles::locate(dir.path(), true).unwrap();
    assert_eq!(files.unet.weights, vec![bad.clone()]);
    assert_eq!(
        files.vae.weights,
        vec![dir.path().join("vae/diffusion_pytorch_model.safetensors")]
    );
}

#[test]
fn hugging_face_cache_snapshot_is_found_from_a_repo_id() {
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("models--someorg--tiny-sd");
    let snap = repo.join("snapshots").join("0123abcd");
    copy_dir(&tiny_model_dir(), &snap);
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    let found = infusion_repl::sd::snapshot_in_cache(cache.path(), "someorg/tiny-sd").unwrap();
    assert_eq!(found, snap);
    let found =
        infusion_repl::sd::snapshot_in_cache(cache.path(), "someorg/tiny-sd@0123abcd").unwrap();
    assert_eq!(found, snap);
    let e = infusion_repl::sd::snapshot_in_cache(cache.path(), "someorg/tiny-sd@v2").unwrap_err();
    assert!(e.to_string().contains("v2"), "{e}");
    let e = infusion_repl::sd::snapshot_in_cache(cache.path(), "other/model").unwrap_err();
    assert!(e.to_string().contains("models--other--model"), "{e}");
    StableDiffusion::load_dir(&found, &LoadOptions::default()).unwrap();
}

#[test]
fn unknown_model_is_a_clear_error() {
    let e = StableDiffusion::load("/no/such/dir", &LoadOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("/no/such/dir"), "{e}");
}

/// Whether this process maps `path` (from /proc/self/maps).
fn mapped(path: &Path) -> bool {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let path = path.canonicalize().unwrap();
    maps.lines().any(|l| l.ends_with(path.to_str().unwrap()))
}

/// On the CPU, weights stored in the dtype asked for are used in place in their mapped files
/// (nothing copied at load): the files stay mapped while the model lives, the mapping goes with
/// the model, and the model computes what a loaded copy computes. Weights that must be converted
/// (f32 files for an f16 model) leave no mapping behind, but the UNet's (kept to train a copy).
#[cfg(target_os = "linux")]
#[test]
fn weights_are_used_in_place_and_released_with_the_model() {
    assert!(infusion_repl::util::in_place_available());
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&tiny_model_dir(), dir.path());
    let unet = dir.path().join("unet/diffusion_pytorch_model.safetensors");
    let sd = StableDiffusion::load_dir(dir.path(), &LoadOptions::default()).unwrap();
    assert!(
        mapped(&unet),
        "the UNet file is not mapped while the model lives"
    );
    let x = infusion_repl::util::seeded_noise(3, &[2, 4, 16, 16]).unwrap();
    let ctx = infusion_repl::util::seeded_noise(4, &[2, 77, 32]).unwrap();
    let t = candle_core::Tensor::new(500f32, &candle_core::Device::Cpu).unwrap();
    let ours = sd.unet.forward(&x, &t, &ctx, None).unwrap();
    let reference = crate::common::tiny()
        .unet
        .forward(&x, &t, &ctx, None)
        .unwrap();
    assert_eq!(crate::common::max_abs(&(ours - reference).unwrap()), 0.0);
    drop(sd);
    assert!(
        !mapped(&unet),
        "the UNet file is still mapped after the model was dropped"
    );

    let f16 = LoadOptions {
        dtype: candle_core::DType::F16,
        ..Default::default()
    };
    // Converted weights are copies; the UNet's file stays mapped (not read) while the model
    // lives, to build a trainable copy from (DreamBooth), and goes with it.
    let sd = StableDiffusion::load_dir(dir.path(), &f16).unwrap();
    let text = dir.path().join("text_encoder/model.safetensors");
    assert!(
        !mapped(&text),
        "converted text-encoder weights keep their file mapped"
    );
    drop(sd);
    assert!(
        !mapped(&unet),
        "the UNet file is still mapped after the model was dropped"
    );
}
