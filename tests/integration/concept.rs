//! Concept files: exact round trips, the size of an SD1.5 concept, and clear refusals of
//! corrupt, truncated, wrong-model and wrong-length files.

use candle_core::{DType, Tensor};
use infusion_repl::sd::UNet;
use infusion_repl::sd::UNetConfig;
use infusion_repl::{Concept, ConceptSet, Job};

use crate::common::{max_abs, tiny};

fn random_concept(name: &str) -> Concept {
    let sd = tiny();
    let mut c = Concept::zeros(
        name,
        "cat",
        sd.unet.attention_layers(),
        Some(sd.unet_fingerprint().into()),
    )
    .unwrap();
    for (i, d) in c.deltas.values_mut().enumerate() {
        *d = infusion_repl::util::seeded_noise(i as u64, d.dims()).unwrap();
    }
    c.train = serde_json::json!({"steps": 10, "lr": 0.01});
    c
}

fn load_err(path: &std::path::Path) -> String {
    let mut set = ConceptSet::new();
    match set.load_file(path, Some(tiny()), false, &Job::quiet()) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn f32_round_trip_is_exact_and_f16_rounds_once() {
    let c = random_concept("mycat");
    let dir = tempfile::tempdir().unwrap();
    let p32 = dir.path().join("c32.safetensors");
    c.save(&p32, DType::F32).unwrap();
    let mut set = ConceptSet::new();
    let job = Job::collecting();
    let loaded = set.load_file(&p32, Some(tiny()), false, &job).unwrap();
    let back = loaded.as_any().downcast_ref::<Concept>().unwrap();
    assert!(job.messages().is_empty(), "{:?}", job.messages());
    assert_eq!((back.name.as_str(), back.word.as_str()), ("mycat", "cat"));
    assert_eq!(back.base_model, c.base_model);
    assert_eq!(back.train, c.train);
    assert_eq!(back.created, c.created);
    for (k, d) in &c.deltas {
        assert_eq!(max_abs(&(d - &back.deltas[k]).unwrap()), 0.0, "{k}");
    }
    let p16 = dir.path().join("c16.safetensors");
    c.save(&p16, DType::F16).unwrap();
    let back = Concept::load(&p16).unwrap();
    for (k, d) in &c.deltas {
        let rounded = d
            .to_dtype(DType::F16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        assert_eq!(max_abs(&(rounded - &back.deltas[k]).unwrap()), 0.0, "{k}");
    }
    assert!(set.get("mycat").is_some());
}

#[test]
fn an_sd15_concept_in_f16_is_about_26_kb() {
    let layers = UNet::attention_layers_of(&UNetConfig::sd15()).unwrap();
    let c = Concept::zeros(
        "mycat",
        "cat",
        &layers,
        Some("sha256:0123456789abcdef01234567".into()),
    )
    .unwrap();
    assert_eq!(c.deltas.len(), 16);
    assert_eq!(c.n_values(), 12_480);
    let bytes = c.to_bytes(DType::F16).unwrap().len();
    // 24,960 bytes of values; the safetensors header with 16 layer-path names adds ~1.8 KB and
    // the metadata ~0.3 KB. (26 KiB = 26,624 bytes cannot hold the layer-path names too.)
    eprintln!("SD1.5 concept, f16: {bytes} bytes");
    assert!(bytes > 24_960 && bytes < 27_500, "{bytes} bytes");
}

#[test]
fn corrupt_and_truncated_files_are_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.safetensors");
    random_concept("mycat").save(&good, DType::F16).unwrap();
    let bytes = std::fs::read(&good).unwrap();

    let trunc = dir.path().join("truncated.safetensors");
    std::fs::write(&trunc, &bytes[..bytes.len() - 10]).unwrap();
    let e = load_err(&trunc);
    // Which bytes are missing, said before any method reads it.
    assert!(
        e.contains("truncated.safetensors") && e.contains("the file holds"),
        "{e}"
    );

    let corrupt = dir.path().join("corrupt.safetensors");
    std::fs::write(&corrupt, b"hello, I am not a concept").unwrap();
    let e = load_err(&corrupt);
    assert!(e.contains("corrupt.safetensors"), "{e}");

    // A valid safetensors file of one tensor and no format metadata: a Textual Inversion
    // embedding in diffusers' layout, which needs the class word it stands for.
    let other = dir.path().join("other.safetensors");
    let t = std::collections::HashMap::from([(
        "x".to_string(),
        Tensor::zeros(3, DType::F32, &candle_core::Device::Cpu).unwrap(),
    )]);
    candle_core::safetensors::save(&t, &other).unwrap();
    let e = load_err(&other);
    assert!(
        e.contains("other.safetensors") && e.contains("holds no class word"),
        "{e}"
    );

    let missing = dir.path().join("missing.safetensors");
    let e = load_err(&missing);
    assert!(e.contains("missing.safetensors"), "{e}");
}

#[test]
fn wrong_model_is_refused_unless_forced_and_unknown_base_warns() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = random_concept("mycat");
    c.base_model = Some("sha256:000000000000000000000000".into());
    let p = dir.path().join("other-model.safetensors");
    c.save(&p, DType::F16).unwrap();
    let e = load_err(&p);
    assert!(
        e.contains("other-model.safetensors") && e.contains("another model"),
        "{e}"
    );
    let mut set = ConceptSet::new();
    let job = Job::collecting();
    set.load_file(&p, Some(tiny()), true, &job).unwrap();
    let w = job.messages();
    assert!(w.iter().any(|w| w.contains("forced")), "{w:?}");

    c.base_model = None;
    c.save(&p, DType::F16).unwrap();
    let job = Job::collecting();
    set.load_file(&p, Some(tiny()), false, &job).unwrap();
    let w = job.messages();
    assert!(w.iter().any(|w| w.contains("does not say")), "{w:?}");
}

#[test]
fn wrong_length_and_missing_layers_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let layer = "mid_block.attentions.0.transformer_blocks.0.attn2";
    let mut c = random_concept("mycat");
    c.deltas.insert(
        layer.into(),
        Tensor::zeros(63, DType::F32, &candle_core::Device::Cpu).unwrap(),
    );
    let p = dir.path().join("short.safetensors");
    c.save(&p, DType::F32).unwrap();
    let e = load_err(&p);
    assert!(
        e.contains(layer) && e.contains("63") && e.contains("64"),
        "{e}"
    );

    let mut c = random_concept("mycat");
    c.deltas.remove(layer);
    c.save(&p, DType::F32).unwrap();
    let e = load_err(&p);
    assert!(e.contains(layer) && e.contains("no Δ"), "{e}");
}

#[test]
fn the_fingerprint_ignores_precision_but_not_weights() {
    let sd = tiny();
    let fp = sd.unet_fingerprint().to_string();
    assert!(fp.starts_with("sha256:"));
    // The same weights stored in f16 give the same fingerprint.
    let dir = tempfile::tempdir().unwrap();
    let src = crate::common::tiny_model_dir().join("unet/diffusion_pytorch_model.safetensors");
    let t = infusion_repl::sd::load_safetensors(&src, &candle_core::Device::Cpu).unwrap();
    let half: std::collections::HashMap<_, _> = t
        .iter()
        .map(|(k, v)| (k.clone(), v.to_dtype(DType::F16).unwrap()))
        .collect();
    let p16 = dir.path().join("u16.safetensors");
    candle_core::safetensors::save(&half, &p16).unwrap();
    let f16 = infusion_repl::sd::WeightFiles::open("UNet", &[p16]).unwrap();
    assert_eq!(f16.fingerprint().unwrap(), fp);
    // Changed weights give another one.
    let mut changed = t.clone();
    let k = "conv_in.weight";
    changed.insert(k.into(), (&t[k] * 1.5).unwrap());
    let pc = dir.path().join("changed.safetensors");
    candle_core::safetensors::save(&changed, &pc).unwrap();
    let other = infusion_repl::sd::WeightFiles::open("UNet", &[pc]).unwrap();
    assert_ne!(other.fingerprint().unwrap(), fp);
}
