//! Property-style tests over the classes of the robustness sweep (issue 10), each with a fixed
//! seed: mutated concept files, hostile prompts, odd training images, model-folder faults,
//! output faults, signals and absurd numbers. The properties: no panic, no abort, no hang within
//! a timeout, and nothing lost (a file that was there is there unchanged after a refusal).

use crate::common::copy_dir;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};
use infusion_repl::infusion::Concept;
use infusion_repl::{
    generate_pair, ConceptSet, GenerateOptions, Job, LoadOptions, PairOptions, StableDiffusion,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::common::{max_abs, tiny, tiny_model_dir};

/// Runs `f`, failing the test if it panics; returns its result.
fn no_panic<T>(
    what: &str,
    f: impl FnOnce() -> infusion_repl::Result<T>,
) -> infusion_repl::Result<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|_| panic!("panicked: {what}"))
}

/// Asserts that `image` is one `(1, 3, size, size)` image, every value finite and in [0, 1].
#[track_caller]
fn assert_sane_image(image: &Tensor, size: usize, what: &str) {
    assert_eq!(image.dims(), [1, 3, size, size], "{what}: shape");
    let v: Vec<f32> = image.flatten_all().unwrap().to_vec1().unwrap();
    assert!(
        v.iter().all(|x| x.is_finite() && (0.0..=1.0).contains(x)),
        "{what}: values outside [0, 1] or not finite"
    );
}

/// Asserts that `e` is a clear refusal: a message that is not blank and contains each
/// of `names`.
#[track_caller]
fn assert_refusal(e: &infusion_repl::Error, names: &[&str], what: &str) {
    let msg = e.to_string();
    assert!(!msg.trim().is_empty(), "{what}: empty error ({e:?})");
    for n in names {
        assert!(
            msg.contains(n),
            "{what}: the error does not name {n:?}: {msg}"
        );
    }
}

fn concept() -> Concept {
    let sd = tiny();
    let mut c = Concept::zeros("pot", "teapot", sd.unet.attention_layers(), None).unwrap();
    for (i, d) in c.deltas.values_mut().enumerate() {
        *d = infusion_repl::util::seeded_noise(i as u64, d.dims()).unwrap();
    }
    c
}

/// A concept file's bytes with the header in one fixed form (keys sorted, padded with spaces).
/// The library writes the metadata from a `HashMap`, in an order that changes from run to run;
/// the seeded mutations must hit the same bytes in every run.
fn canonical(bytes: &[u8]) -> Vec<u8> {
    use std::collections::BTreeMap;
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let h: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let h: BTreeMap<String, serde_json::Value> = h
        .into_iter()
        .map(|(k, v)| {
            let v = match v {
                serde_json::Value::Object(m) => {
                    serde_json::to_value(m.into_iter().collect::<BTreeMap<_, _>>()).unwrap()
                }
                v => v,
            };
            (k, v)
        })
        .collect();
    let mut hb = serde_json::to_vec(&h).unwrap();
    hb.resize(hb.len().div_ceil(8) * 8, b' ');
    let mut out = (hb.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&hb);
    out.extend_from_slice(&bytes[8 + n..]);
    out
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

/// Mutated concept files load or are refused, never panic. A refusal names the file. What
/// loads holds only finite, non-empty Δs and is usable: either the model refuses it
/// (`check_model`, forced past a base-model mismatch) with an error naming `<name>`, or a
/// 1-step Infusion generation of `a <name>` gives a finite F and C image of the model's size in
/// [0, 1] with the concept used. The one exception: a flipped exponent bit can leave a finite
/// but huge Δ (the file's are N(0, 1) draws, |Δ| < 10); with any |Δ| > 100 the generation may
/// instead be refused as `Error::NotFinite`, the error that names the stage that overflowed.
/// More than half of the 200 mutations must be refused (most break the file), and some must
/// generate (or the "usable" half tested nothing).
#[test]
fn mutated_concepts_never_panic() {
    let mut original = concept();
    assert!(original.deltas.values().all(|d| max_abs(d) < 10.0));
    original.created = "2026-01-01T00:00:00Z".into();
    let bytes = canonical(&original.to_bytes(DType::F32).unwrap());
    Concept::from_bytes(&bytes, Path::new("m.safetensors")).expect("the unmutated file loads");
    let size = tiny().default_size();
    let mut o = PairOptions::default();
    o.generate.steps = 1;
    let mut rng = ChaCha8Rng::seed_from_u64(10);
    let (mut generated, mut overflowed, mut misfit, mut refused) = (0, 0, 0, 0);
    for i in 0..200 {
        let m = mutate(&bytes, &mut rng);
        let r = catch_unwind(|| Concept::from_bytes(&m, Path::new("m.safetensors")))
            .unwrap_or_else(|_| panic!("mutation {i} panicked"));
        let c = match r {
            Ok(c) => c,
            Err(e) => {
                refused += 1;
                assert_refusal(&e, &["m.safetensors"], &format!("mutation {i}"));
                continue;
            }
        };
        let mut largest = 0f32;
        for (k, d) in &c.deltas {
            let v: Vec<f32> = d.flatten_all().unwrap().to_vec1().unwrap();
            assert!(
                !v.is_empty() && v.iter().all(|x| x.is_finite()),
                "mutation {i}: loaded with an empty or non-finite Δ `{k}`"
            );
            largest = v.iter().fold(largest, |m, x| m.max(x.abs()));
        }
        let name = c.name.clone();
        let what = format!("mutation {i} (<{name}>)");
        match no_panic(&what, || {
            c.check_model(tiny().unet.attention_layers(), "x", true)
        }) {
            Ok(_) => {
                let mut set = ConceptSet::new();
                set.insert(c, true);
                let r = no_panic(&what, || {
                    generate_pair(
                        tiny(),
                        &set,
                        &format!("a <{name}>"),
                        &o,
                        None,
                        &Job::collecting(),
                    )
                });
                let g = match r {
                    Ok(g) => g,
                    Err(e @ infusion_repl::Error::NotFinite(_)) if largest > 100.0 => {
                        overflowed += 1;
                        assert_refusal(&e, &[], &what);
                        continue;
                    }
                    Err(e) => panic!(
                        "{what}: loads and fits (max |Δ| {largest}), but does not generate: {e}"
                    ),
                };
                generated += 1;
                assert_eq!(g.concepts, std::slice::from_ref(&name), "{what}");
                assert_sane_image(&g.base_image, size, &format!("{what}: F"));
                assert_sane_image(&g.custom_image, size, &format!("{what}: C"));
            }
            Err(e) => {
                misfit += 1;
                assert_refusal(&e, &[&format!("<{name}>")], &what);
            }
        }
    }
    let counts = format!(
        "{generated} generated, {overflowed} overflowed, {misfit} refused by the model, \
         {refused} refused"
    );
    eprintln!("{counts}");
    assert!(refused > 100 && generated > 0, "{counts}");
}

/// What a prompt with `<pot>` loaded should give, by the rules of concept marks
/// (src/infusion/prompt.rs): a mark is `<`, one or more letters, digits, `_` or `-`, then `>`;
/// any other `<` is text. The first mark (left to right) with a letter, digit, `<` or `>` right
/// before or after it is refused ("stand apart"); the first naming anything but `pot` is
/// refused naming it. Otherwise F's prompt is the text with each mark replaced by `teapot`.
enum Expect {
    Image { base: String, marks: usize },
    Refused(String),
}

fn expect(prompt: &str) -> Expect {
    let name_char = |c: char| c.is_alphanumeric() || c == '_' || c == '-';
    let touches = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '<' || c == '>');
    let (mut base, mut marks, mut i) = (String::new(), 0, 0);
    while let Some(c) = prompt[i..].chars().next() {
        if c == '<' {
            let name: String = prompt[i + 1..]
                .chars()
                .take_while(|&c| name_char(c))
                .collect();
            let end = i + 1 + name.len();
            if !name.is_empty() && prompt[end..].starts_with('>') {
                let end = end + 1;
                if touches(prompt[..i].chars().next_back()) || touches(prompt[end..].chars().next())
                {
                    return Expect::Refused("stand apart".into());
                }
                if name != "pot" {
                    return Expect::Refused(format!("no concept named <{name}>"));
                }
                base.push_str("teapot");
                marks += 1;
                i = end;
                continue;
            }
        }
        base.push(c);
        i += c.len_utf8();
    }
    Expect::Image { base, marks }
}

/// Hostile prompts (marks, brackets, unicode, control characters, thousands of tokens) never
/// panic, and each gives what [`expect`] says: a refusal whose message contains the reason
/// (and the unknown name), or a 1-step generation whose F prompt is the expected text, whose
/// concepts are one `pot` per mark, and whose F and C images are `(1, 3, S, S)` at the model's
/// size, finite and in [0, 1] (C equal to F where the prompt has no mark). A prompt longer than
/// the text encoder takes is warned about; if it has marks it may instead be refused because a
/// `<pot>`'s word was cut off. Each of the three outcomes must occur at least once.
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
    let mut o = PairOptions::default();
    o.generate.steps = 1;
    let size = tiny().default_size();
    let (mut plain, mut customized, mut refused) = (0, 0, 0);
    for i in 0..60 {
        let n = if i % 10 == 9 {
            400
        } else {
            rng.random_range(0..12)
        };
        let prompt: String = (0..n)
            .map(|_| pieces[rng.random_range(0..pieces.len())])
            .collect();
        let what = format!("prompt {i} {prompt:?}");
        let job = Job::collecting();
        let r = no_panic(&what, || {
            generate_pair(tiny(), &set, &prompt, &o, None, &job)
        });
        match (expect(&prompt), r) {
            (Expect::Refused(why), Err(e)) => {
                refused += 1;
                assert_refusal(&e, &[&why], &what);
            }
            (Expect::Refused(why), Ok(_)) => panic!("{what}: generated, expected refused ({why})"),
            (Expect::Image { base, marks }, r) => {
                let long = tiny().tokenize(&base).unwrap().truncated();
                let g = match r {
                    Ok(g) => g,
                    Err(e) if long && marks > 0 => {
                        refused += 1;
                        assert_refusal(&e, &["<pot>", "cut off"], &what);
                        continue;
                    }
                    Err(e) => panic!("{what}: refused ({e}), expected an image"),
                };
                assert_eq!(g.parsed.base, base, "{what}: F's prompt");
                assert_eq!(
                    g.concepts,
                    vec!["pot".to_string(); marks],
                    "{what}: concepts"
                );
                assert_sane_image(&g.base_image, size, &format!("{what}: F"));
                assert_sane_image(&g.custom_image, size, &format!("{what}: C"));
                if marks == 0 {
                    plain += 1;
                    let d = max_abs(&(&g.custom_image - &g.base_image).unwrap());
                    assert_eq!(d, 0.0, "{what}: no mark, yet C differs from F");
                } else {
                    customized += 1;
                }
                if long {
                    assert!(
                        job.messages().iter().any(|m| m.contains("cut off")),
                        "{what}: too long, yet no warning: {:?}",
                        job.messages()
                    );
                }
            }
        }
    }
    eprintln!("{plain} plain, {customized} customized, {refused} refused");
    assert!(
        plain > 0 && customized > 0 && refused > 0,
        "{plain} plain, {customized} customized, {refused} refused"
    );
}

/// Odd training images (1 pixel wide, very tall, gray, transparent, 16-bit, not images at all)
/// never panic. A folder with at least one image loads every image at its size, as 8-bit RGB
/// (gray v -> (v, v, v), fully transparent -> white, 16-bit (65535, 0, 300) -> (255, 0, 1)),
/// warns "skipped" naming each file that is not an image, and trains one step:
/// a finite loss >= 0, one step done, and finite Δs of which some moved from zero. A folder
/// with no image is refused naming the folder and each unreadable file. Cases 0-7 are drawn
/// from a fixed seed; case 8 is a folder of one non-image, so the refusal is always exercised.
/// An image as loaded: its size and first pixel.
type Loaded = ((u32, u32), [u8; 3]);

#[test]
fn odd_images_never_panic() {
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let (mut trained, mut refused) = (0, 0);
    for case in 0..9 {
        let dir = tempfile::tempdir().unwrap();
        // (file, size and first pixel as loaded), or (file, None) for a non-image.
        let mut files: Vec<(String, Option<Loaded>)> = vec![];
        let n = if case == 8 { 1 } else { rng.random_range(1..4) };
        for i in 0..n {
            let (w, h) = [(1, 1), (1, 90), (90, 1), (3, 500), (33, 17)][rng.random_range(0..5)];
            let name = format!("{i}.png");
            let p = dir.path().join(&name);
            let kind = if case == 8 { 3 } else { rng.random_range(0..4) };
            let (saved, pixel) = match kind {
                0 => {
                    let v: u8 = rng.random();
                    let img = image::GrayImage::from_pixel(w, h, image::Luma([v]));
                    (img.save(&p), Some([v, v, v]))
                }
                1 => (
                    image::RgbaImage::from_pixel(w, h, image::Rgba([9, 9, 9, 0])).save(&p),
                    Some([255, 255, 255]),
                ),
                2 => (
                    image::ImageBuffer::<image::Rgb<u16>, _>::from_pixel(
                        w,
                        h,
                        image::Rgb([65535, 0, 300]),
                    )
                    .save(&p),
                    Some([255, 0, 1]),
                ),
                _ => (
                    std::fs::write(&p, [rng.random::<u8>(); 20]).map_err(Into::into),
                    None,
                ),
            };
            saved.unwrap();
            files.push((name, pixel.map(|px| ((w, h), px))));
        }
        let what = format!("images {case} {files:?}");
        let job = Job::collecting();
        let loaded = no_panic(&what, || {
            infusion_repl::util::load_folder_images(dir.path(), &job)
        });
        let expected: Vec<_> = files.iter().filter_map(|(_, e)| *e).collect();
        let unreadable: Vec<&str> = files
            .iter()
            .filter(|(_, e)| e.is_none())
            .map(|(n, _)| n.as_str())
            .collect();
        let images = match loaded {
            Err(e) if expected.is_empty() => {
                refused += 1;
                let folder = dir.path().to_string_lossy();
                let mut names = vec![&*folder, "no readable image"];
                names.extend(&unreadable);
                assert_refusal(&e, &names, &what);
                continue;
            }
            Err(e) => panic!("{what}: refused ({e}), but it holds images"),
            Ok(_) if expected.is_empty() => panic!("{what}: loaded a folder without images"),
            Ok(images) => images,
        };
        let got: Vec<_> = images
            .iter()
            .map(|i| (i.dimensions(), i.get_pixel(0, 0).0))
            .collect();
        assert_eq!(got, expected, "{what}: images as loaded");
        for n in &unreadable {
            assert!(
                job.messages()
                    .iter()
                    .any(|m| m.contains("skipped") && m.contains(n)),
                "{what}: no warning that {n} was skipped: {:?}",
                job.messages()
            );
        }
        let opts = infusion_repl::train::TrainOptions {
            steps: 1,
            ..Default::default()
        };
        let mut t = no_panic(&what, || {
            infusion_repl::infusion::trainer(tiny(), "pot", "teapot", &images, opts)
        })
        .unwrap_or_else(|e| panic!("{what}: no trainer: {e}"));
        let loss = no_panic(&what, || t.step()).unwrap_or_else(|e| panic!("{what}: step: {e}"));
        assert!(loss.is_finite() && loss >= 0.0, "{what}: loss {loss}");
        assert_eq!(t.steps_done(), 1, "{what}");
        let c = infusion_repl::infusion::trained_concept(&t).unwrap();
        let moved = c.deltas.values().map(max_abs).fold(0.0f32, f32::max);
        assert!(
            moved.is_finite() && moved > 0.0,
            "{what}: Δs after one step: max |Δ| {moved}"
        );
        trained += 1;
    }
    assert!(
        trained > 0 && refused > 0,
        "{trained} trained, {refused} refused"
    );
}

/// Faults of a model folder: every file of the tiny model's folder, each gone, cut short (at a
/// seeded random length), overwritten with garbage or with JSON that says something else (40
/// cases). None panics. A refusal is a clear error that names the faulted file or its folder
/// (`unet/`, `tokenizer/`, the model folder for `model_index.json`). Only the scheduler config
/// may be at fault and still load (a folder without one gets SD1.5's schedule, a config without
/// some keys DDIM's defaults: `ModelConfigs::from_dir`, `SchedulerConfig`); without it the model
/// must load. Whatever loads must be usable: a 2-step generation of "a teapot" gives a
/// `(1, 3, S, S)` image at the intact model's size, finite and in [0, 1].
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
    let faults = ["gone", "cut", "garbage", "other JSON"];
    let opts = GenerateOptions {
        steps: 2,
        ..Default::default()
    };
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let (mut loaded, mut refused) = (0, 0);
    for file in files {
        for fault in faults {
            let dir = tempfile::tempdir().unwrap();
            copy_dir(&tiny_model_dir(), dir.path());
            let f = dir.path().join(file);
            match fault {
                "gone" => std::fs::remove_file(&f).unwrap(),
                "cut" => {
                    let b = std::fs::read(&f).unwrap();
                    std::fs::write(&f, &b[..rng.random_range(0..b.len())]).unwrap();
                }
                "garbage" => std::fs::write(&f, b"\x00garbage\xff").unwrap(),
                _ => std::fs::write(&f, b"{\"sample_size\": -3, \"_class_name\": 7}").unwrap(),
            }
            let what = format!("{file} {fault}");
            let r = no_panic(&what, || {
                StableDiffusion::load_dir(dir.path(), &LoadOptions::default())
            });
            let may_load = file.starts_with("scheduler/");
            let sd = match r {
                Err(e) if may_load && fault == "gone" => {
                    panic!("{what}: refused ({e}); a folder without a scheduler config loads")
                }
                Err(e) => {
                    refused += 1;
                    let culprit = f.parent().unwrap().to_string_lossy();
                    assert_refusal(&e, &[&culprit], &what);
                    continue;
                }
                Ok(_) if !may_load => panic!("{what}: loaded a model with a broken part"),
                Ok(sd) => sd,
            };
            loaded += 1;
            let g = no_panic(&what, || sd.generate("a teapot", &opts, &Job::quiet()))
                .unwrap_or_else(|e| panic!("{what}: loads, but does not generate: {e}"));
            assert_sane_image(&g.image, tiny().default_size(), &what);
            eprintln!("{what}: loads and generates");
        }
    }
    eprintln!("{loaded} loaded, {refused} refused");
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
            no_panic(target, || c.save(&path, DType::F16)).is_err(),
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

/// SIGINT or SIGTERM at a random moment (0.1 to 2.5 s in) of a 40-step training run; the cases
/// alternate the two signals. The process must end within 120 s by exiting (a death by any
/// signal, SIGSEGV, SIGABRT or SIGBUS as much as the one sent, fails), with exactly the status
/// the tool promises (src/app/signals.rs): 130 after SIGINT, 143 after SIGTERM, or 0 if the run
/// had already finished; 1 (a failure) or any other code fails. Nothing is lost: exit 0 prints
/// the saved file; a stop during training says "saved in FILE"; either file loads as the
/// concept `p`. A stop before training began says "cancelled" and writes no file.
#[cfg(unix)]
#[test]
fn signals_at_random_moments_lose_nothing() {
    use std::os::unix::process::ExitStatusExt;
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
        let (stdout, stderr) = (
            dir.path().join(format!("c{case}.out")),
            dir.path().join(format!("c{case}.err")),
        );
        let mut child = Command::new(env!("CARGO_BIN_EXE_infusion-repl"))
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
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let wait = rng.random_range(100..2500);
        std::thread::sleep(Duration::from_millis(wait));
        let (sig, promised) = if case % 2 == 0 {
            ("-INT", 130)
        } else {
            ("-TERM", 143)
        };
        // Not yet reaped, so the pid is ours even if the run has finished.
        let sent = Command::new("kill")
            .args([sig, &child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success(), "case {case}: kill {sig} failed");
        let start = Instant::now();
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
        let err = std::fs::read_to_string(&stderr).unwrap();
        let what = format!("case {case}: {sig} after {wait} ms gave {status:?}\n{err}");
        assert_eq!(status.signal(), None, "{what}: died by a signal");
        let code = status.code().unwrap();
        let saved = dir.path().join(&out);
        let claimed = if code == 0 {
            let printed = std::fs::read_to_string(&stdout).unwrap();
            Some(printed.lines().last().unwrap_or_default().to_string())
        } else {
            assert_eq!(code, promised, "{what}: not the status {sig} promises");
            err.lines()
                .find_map(|l| l.split_once("saved in ").map(|(_, p)| p.trim().to_string()))
        };
        match claimed {
            Some(p) => {
                let c = Concept::load(&dir.path().join(&p)).unwrap_or_else(|e| {
                    panic!("{what}: it says it saved {p}, which does not load: {e}")
                });
                assert_eq!(c.name, "p", "{what}");
                eprintln!("case {case}: {sig} after {wait} ms: exit {code}, saved {p}");
            }
            None => {
                assert!(
                    err.contains("cancelled"),
                    "{what}: stopped without saving or saying why"
                );
                assert!(!saved.exists(), "{what}: wrote {out} without saying so");
                eprintln!("case {case}: {sig} after {wait} ms: exit {code} before training");
            }
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
