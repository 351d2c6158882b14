//! Property-style tests over the classes of the robustness sweep (issue 10), each with a fixed
//! seed: mutated concept files, hostile prompts, odd training images, model-folder faults,
//! output faults, signals and absurd numbers. The properties: no panic, no abort, no hang within
//! a timeout, and nothing lost (a file that was there is there unchanged after a refusal).

use crate::common::copy_dir;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use candle_core::DType;
use infusion_repl::infusion::concept::Concept;
use infusion_repl::{
    generate_infusion, ConceptSet, InfusionOptions, Job, LoadOptions, StableDiffusion,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::common::{tiny, tiny_model_dir};

/// Runs `f`, failing the test if it panics; returns whether it succeeded.
fn no_panic<T>(what: &str, f: impl FnOnce() -> infusion_repl::Result<T>) -> bool {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r.is_ok(),
        Err(_) => panic!("panicked: {what}"),
    }
}

fn concept() -> Concept {
    let sd = tiny();
    let mut c = Concept::zeros("pot", "teapot", sd.unet.attention_layers(), None).unwrap();
    for (i, d) in c.deltas.values_mut().enumerate() {
        *d = infusion_repl::util::noise::seeded_noise(i as u64, d.dims()).unwrap();
    }
    c
}

/// One random change to a concept file's bytes: flipped bytes, a cut, garbage at the end, or a
/// header field rewritten (dtype, shape, offsets, metadata).
fn mutate(bytes: &[u8], rng: &mut ChaCha8Rng) -> Vec<u8> {
    let mut b = bytes.to_vec();
    match rng.random_range(0..5) {
        0 => {
            for _ in 0..rng.random_range(1..8) {
                let i = rng.random_range(0..b.len());
                b[i] ^= 1 << rng.random_range(0..8);
            }
        }
        1 => b.truncate(rng.random_range(0..b.len())),
        2 => b.extend((0..rng.random_range(1..64)).map(|_| rng.random::<u8>())),
        _ => {
            let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
            let mut h: serde_json::Value = serde_json::from_slice(&b[8..8 + n]).unwrap();
            let keys: Vec<String> = h.as_object().unwrap().keys().cloned().collect();
            let k = &keys[rng.random_range(0..keys.len())];
            let values = [
                serde_json::json!("I32"),
                serde_json::json!([1, 2]),
                serde_json::json!([0, 1_000_000]),
                serde_json::json!(-1),
                serde_json::json!(""),
                serde_json::json!({"format": "x"}),
            ];
            let v = values[rng.random_range(0..values.len())].clone();
            if k == "__metadata__" {
                let fields = ["format", "name", "word", "train", "base_model"];
                h[k][fields[rng.random_range(0..fields.len())]] =
                    serde_json::json!(["", "<", "{", "a b"][rng.random_range(0..4)]);
            } else {
                let fields = ["dtype", "shape", "data_offsets"];
                h[k][fields[rng.random_range(0..fields.len())]] = v;
            }
            let mut hb = serde_json::to_vec(&h).unwrap();
            hb.resize(hb.len().div_ceil(8) * 8, b' ');
            let mut out = (hb.len() as u64).to_le_bytes().to_vec();
            out.extend_from_slice(&hb);
            out.extend_from_slice(&b[8 + n..]);
            b = out;
        }
    }
    b
}

/// Mutated concept files load or are refused, never panic; what loads is usable.
#[test]
fn mutated_concepts_never_panic() {
    let bytes = concept().to_bytes(DType::F32).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(10);
    let (mut loaded, mut refused) = (0, 0);
    for i in 0..200 {
        let m = mutate(&bytes, &mut rng);
        let r = catch_unwind(|| Concept::from_bytes(&m, Path::new("m.safetensors")))
            .unwrap_or_else(|_| panic!("mutation {i} panicked"));
        match r {
            Ok(c) => {
                loaded += 1;
                let ok = no_panic("check", || {
                    c.check_model(tiny().unet.attention_layers(), "x", true)
                });
                let _ = ok;
            }
            Err(e) => {
                refused += 1;
                assert!(e.to_string().contains("m.safetensors"), "{e}");
            }
        }
    }
    assert!(refused > 100, "{loaded} loaded, {refused} refused");
}

/// Hostile prompts (marks, brackets, unicode, control characters, thousands of tokens) generate
/// or are refused, never panic.
#[test]
fn hostile_prompts_never_panic() {
    let mut set = ConceptSet::new();
    set.insert(concept(), true);
    let pieces = [
        "<pot>",
        "<pot",
        "pot>",
        "<>",
        "<<pot>>",
        "<nope>",
        "a",
        " ",
        "\n",
        "\t",
        "\u{0}",
        "\u{202e}",
        "猫",
        "🐱",
        "<pot>s",
        "'s",
        "{}",
        "\\",
        "\"",
        "teapot ",
        "<|endoftext|>",
        "<|startoftext|>",
        "........",
        "<p-o_t>",
    ];
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut o = InfusionOptions::default();
    o.generate.steps = 1;
    for i in 0..60 {
        let n = if i % 10 == 9 {
            400
        } else {
            rng.random_range(0..12)
        };
        let prompt: String = (0..n)
            .map(|_| pieces[rng.random_range(0..pieces.len())])
            .collect();
        no_panic(&format!("prompt {prompt:?}"), || {
            generate_infusion(tiny(), &set, &prompt, &o, None, &Job::collecting())
        });
    }
}

/// Odd training images (1 pixel wide, very tall, gray, transparent, 16-bit, not images at all)
/// train one step or are refused, never panic.
#[test]
fn odd_images_never_panic() {
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    for case in 0..8 {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..rng.random_range(1..4) {
            let (w, h) = [(1, 1), (1, 90), (90, 1), (3, 500), (33, 17)][rng.random_range(0..5)];
            let p = dir.path().join(format!("{i}.png"));
            match rng.random_range(0..4) {
                0 => image::GrayImage::from_pixel(w, h, image::Luma([rng.random()])).save(&p),
                1 => image::RgbaImage::from_pixel(w, h, image::Rgba([9, 9, 9, 0])).save(&p),
                2 => image::ImageBuffer::<image::Rgb<u16>, _>::from_pixel(
                    w,
                    h,
                    image::Rgb([65535, 0, 300]),
                )
                .save(&p),
                _ => std::fs::write(&p, [rng.random::<u8>(); 20]).map_err(Into::into),
            }
            .unwrap();
        }
        no_panic(&format!("images {case}"), || {
            let images =
                infusion_repl::util::image_io::load_folder_images(dir.path(), &Job::collecting())?;
            let opts = infusion_repl::train::TrainOptions {
                steps: 1,
                ..Default::default()
            };
            let mut t =
                infusion_repl::infusion::train::trainer(tiny(), "pot", "teapot", &images, opts)?;
            t.step()
        });
    }
}

/// Faults of a model folder (a file gone, cut short, overwritten with garbage or JSON that
/// says something else) are refused with an error that names a file of the folder, never panic.
#[test]
fn model_folder_faults_never_panic() {
    let files = [
        "model_index.json",
        "unet/config.json",
        "vae/config.json",
        "text_encoder/config.json",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "scheduler/scheduler_config.json",
    ];
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    for case in 0..20 {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(&tiny_model_dir(), dir.path());
        let f = dir.path().join(files[rng.random_range(0..files.len())]);
        match rng.random_range(0..4) {
            0 => std::fs::remove_file(&f).unwrap(),
            1 => {
                let b = std::fs::read(&f).unwrap();
                std::fs::write(&f, &b[..rng.random_range(0..b.len())]).unwrap();
            }
            2 => std::fs::write(&f, b"\x00garbage\xff").unwrap(),
            _ => std::fs::write(&f, b"{\"sample_size\": -3, \"_class_name\": 7}").unwrap(),
        }
        let r = catch_unwind(|| StableDiffusion::load_dir(dir.path(), &LoadOptions::default()))
            .unwrap_or_else(|_| panic!("case {case}: {} panicked", f.display()));
        if let Err(e) = r {
            let e = e.to_string();
            assert!(
                e.contains(&*dir.path().to_string_lossy()),
                "case {case}: {e}"
            );
        }
    }
}

/// Output faults (a missing folder, a folder, a read-only file, a dangling link) refuse the
/// write and keep what was there; no temporary file is left behind.
#[cfg(unix)]
#[test]
fn output_faults_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let keep = dir.path().join("keep.png");
    std::fs::write(&keep, b"precious").unwrap();
    let mut p = std::fs::metadata(&keep).unwrap().permissions();
    p.set_readonly(true);
    std::fs::set_permissions(&keep, p).unwrap();
    std::fs::create_dir(dir.path().join("adir")).unwrap();
    std::os::unix::fs::symlink("missing/x.png", dir.path().join("dangling.png")).unwrap();
    let c = concept();
    for target in ["keep.png", "adir", "nodir/x.png", "dangling.png"] {
        let path = dir.path().join(target);
        assert!(
            !no_panic(target, || c.save(&path, DType::F16)),
            "{target} was written"
        );
    }
    assert_eq!(std::fs::read(&keep).unwrap(), b"precious");
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("infusion-tmp"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// SIGINT or SIGTERM at a random moment of a training run: the process ends within the timeout
/// with 0 (it had finished), 130 or 143, and whatever it says it saved loads.
#[cfg(unix)]
#[test]
fn signals_at_random_moments_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let imgs = dir.path().join("imgs");
    std::fs::create_dir(&imgs).unwrap();
    for i in 0..3u8 {
        image::RgbImage::from_fn(32, 32, |x, y| {
            image::Rgb([x as u8 * 7, y as u8 * 7, i * 80])
        })
        .save(imgs.join(format!("{i}.png")))
        .unwrap();
    }
    let mut rng = ChaCha8Rng::seed_from_u64(14);
    for case in 0..4 {
        let out = format!("c{case}.safetensors");
        let child = Command::new(env!("CARGO_BIN_EXE_infusion-repl"))
            .args([
                "train",
                "imgs",
                "--name",
                "p",
                "--word",
                "pot",
                "--train-steps",
                "40",
                "-o",
                &out,
            ])
            .current_dir(dir.path())
            .env_remove("INFUSION_MODEL")
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rng.random_range(100..2500)));
        let sig = if rng.random_bool(0.5) {
            "-INT"
        } else {
            "-TERM"
        };
        let _ = Command::new("kill")
            .args([sig, &child.id().to_string()])
            .status();
        let start = Instant::now();
        let mut child = child;
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if start.elapsed() > Duration::from_secs(120) {
                let _ = child.kill();
                panic!("case {case}: no exit 120 s after {sig}");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let code = status.code();
        assert!(
            matches!(code, Some(0 | 1 | 130 | 143)) || status.code().is_none(),
            "case {case}: {sig} gave {status:?}"
        );
        let saved = dir.path().join(&out);
        if matches!(code, Some(0 | 130 | 143)) && saved.exists() {
            Concept::load(&saved).unwrap_or_else(|e| panic!("case {case}: {e}"));
        }
        if matches!(code, Some(130 | 143)) {
            assert!(
                saved.exists(),
                "case {case}: stopped by {sig} without saving"
            );
        }
    }
}

/// Absurd numbers for every size, count and scale reach the bound functions from a script that
/// catches each error: the process survives them all (an abort would end it).
#[test]
fn absurd_numbers_never_abort_a_session() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("absurd.rhai");
    let values = "[0, -1, 1000000000, 9223372036854775807, 1.0e300, -0.0, 0.0 / 0.0, 1.0 / 0.0]";
    std::fs::write(
        &script,
        format!(
            r#"
let m = load_model();
let g = m.generate("a", #{{steps: 1}});
let survived = 0;
for v in {values} {{
    for key in ["width", "height", "steps", "seed", "guidance", "replace_steps"] {{
        let o = #{{steps: 1}};
        o[key] = v;
        try {{ m.generate("a", o); }} catch (e) {{ }}
        survived += 1;
    }}
    // (Not train_steps: a large count is long work, not a fault.)
    for key in ["batch", "lr"] {{
        let o = #{{train_steps: 1}};
        o[key] = v;
        try {{ m.train_concept("imgs", "p", "pot", o); }} catch (e) {{ }}
        survived += 1;
    }}
    try {{ g.base.resize(v, v); }} catch (e) {{ }}
    try {{ grid([g.base], v); }} catch (e) {{ }}
    try {{ wasserstein([g.base_latents, g.custom_latents], [g.base_latents, g.custom_latents], #{{pool: v}}); }} catch (e) {{ }}
    try {{ fisher_divergence(m, m, ["a"], #{{samples: v, steps: 1}}); }} catch (e) {{ }}
    survived += 4;
}}
print(`survived ${{survived}}`);
"#
        ),
    )
    .unwrap();
    let imgs = dir.path().join("imgs");
    std::fs::create_dir(&imgs).unwrap();
    for i in 0..3u8 {
        image::RgbImage::from_pixel(32, 32, image::Rgb([i * 80, 9, 9]))
            .save(imgs.join(format!("{i}.png")))
            .unwrap();
    }
    let o = Command::new(env!("CARGO_BIN_EXE_infusion-repl"))
        .arg("--no-images")
        .arg(&script)
        .current_dir(dir.path())
        .env_remove("INFUSION_MODEL")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && out.contains("survived 96"),
        "{:?}\n{out}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
}
