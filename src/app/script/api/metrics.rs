//! The metrics in scripts: Fisher divergence, W2, CLIP/DINO scores, the evaluation runner and
//! over-training curves.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Tensor;
use image::RgbImage;
use rhai::{Array, Dynamic, Map, FLOAT, INT};

use super::concepts::ConceptVal;
use super::images::Img;
use super::model::Model;
use super::tensors::TensorVal;
use super::Api;
use crate::app::script::docs::{FnSpec, Kind, OptSpec};
use crate::app::script::{err, rt, Opts, RhaiResult, Session};
use crate::customize::set::ConceptSet;
use crate::metrics::clip::Clip;
use crate::metrics::curves::{overtraining_curves, CurveOptions};
use crate::metrics::dino::Dino;
use crate::metrics::eval::{evaluate, EvalConcept, EvalOptions};
use crate::metrics::fisher::{fisher_divergence, unet_from_file, FisherOptions, Variant};
use crate::metrics::scores;
use crate::metrics::w2::wasserstein;
use crate::train::TrainOptions;
use crate::util::image_io::load_folder_images;

/// A loaded CLIP model (cheap to clone).
#[derive(Clone)]
pub struct ClipVal(pub Arc<Clip>);

/// A loaded DINO model (cheap to clone).
#[derive(Clone)]
pub struct DinoVal(pub Arc<Dino>);

impl std::fmt::Display for ClipVal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Clip({})", self.0.path().display())
    }
}

impl std::fmt::Display for DinoVal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Dino({})", self.0.path().display())
    }
}

fn device(session: &Session) -> RhaiResult<candle_core::Device> {
    rt(crate::sd::device::parse_device(
        &session.config.model.device,
    ))
}

/// Images from an array of images, or a folder path.
fn images_arg(v: Dynamic, what: &str) -> RhaiResult<Vec<RgbImage>> {
    if v.is_string() {
        let folder = v.to_string();
        // Skipped files are reported as any job reports them (on stderr).
        return rt(load_folder_images(
            Path::new(&folder),
            &crate::job::Job::default(),
        ));
    }
    let arr = v.into_array().map_err(|t| {
        err(format!(
            "{what}: expected an array of images or a folder, not {t}"
        ))
    })?;
    arr.into_iter()
        .enumerate()
        .map(|(i, x)| {
            x.try_cast::<Img>()
                .map(|img| (*img.rgb).clone())
                .ok_or_else(|| err(format!("{what}: element {i} is not an image")))
        })
        .collect()
}

fn strings_arg(v: Dynamic, what: &str) -> RhaiResult<Vec<String>> {
    if v.is_string() {
        return Ok(vec![v.to_string()]);
    }
    let arr = v.into_array().map_err(|t| {
        err(format!(
            "{what}: expected a string or an array of strings, not {t}"
        ))
    })?;
    arr.into_iter()
        .map(|x| {
            if x.is_string() {
                Ok(x.to_string())
            } else {
                Err(err(format!("{what}: {x} is not a string")))
            }
        })
        .collect()
}

/// Latents `[n, ...]` from a tensor, or an array of tensors (concatenated).
fn latents_arg(v: Dynamic, what: &str) -> RhaiResult<Tensor> {
    if let Some(t) = v.clone().try_cast::<TensorVal>() {
        return Ok((*t.0).clone());
    }
    let arr = v.into_array().map_err(|t| {
        err(format!(
            "{what}: expected a tensor or an array of tensors, not {t}"
        ))
    })?;
    let ts = arr
        .into_iter()
        .enumerate()
        .map(|(i, x)| {
            x.try_cast::<TensorVal>()
                .map(|t| (*t.0).clone())
                .ok_or_else(|| err(format!("{what}: element {i} is not a tensor")))
        })
        .collect::<RhaiResult<Vec<_>>>()?;
    rt(Tensor::cat(&ts, 0).map_err(Into::into))
}

fn fisher_spec() -> FnSpec {
    let d = FisherOptions::default();
    FnSpec::new("fisher_divergence")
        .sig("fisher_divergence(model, other, prompts) -> #{mean, std_err, samples}")
        .sig("fisher_divergence(model, other, prompts, options) -> #{mean, std_err, samples}")
        .doc("Latent Fisher divergence (concept-agnostic overfitting, the paper's Definition 3.1): 1/2 times the mean over prompts, latents, uniform timesteps and noise of ||eps_a - eps_b||^2 between the model and a variant: other is a concept or an array of concepts (applied to the prompts' <name> marks), another model (its UNet), or a UNet weight file. Deterministic for a seed. Prompts without marks give exactly 0 for concepts.")
        .opt("samples", Kind::POSITIVE, d.samples as INT, "Monte-Carlo samples (latent, timestep, noise)")
        .opt("seed", Kind::SEED, d.seed as INT, "seed of the draws")
        .opt("batch", Kind::POSITIVE, d.batch as INT, "samples per UNet call")
        .opt_unset("images", Kind::Str, "a folder of clean images to noise (default: the model's own generations)")
        .opt("steps", Kind::POSITIVE, d.gen_steps as INT, "denoising steps of those generations")
        .example("let f = fisher_divergence(m, [cat], [\"a photo of a dog\", \"a <mycat> on a sofa\"], #{samples: 64}); print(f.mean);")
}

/// The second variant of `fisher_divergence`: a model, a UNet file, a concept or concepts.
fn fisher(
    session: &Session,
    spec: &FnSpec,
    a: &Model,
    b: Dynamic,
    prompts: Dynamic,
    opts: &Map,
) -> RhaiResult<Map> {
    let o = Opts::of(opts, spec)?;
    let d = FisherOptions::default();
    let fo = FisherOptions {
        samples: o.usize("samples").unwrap_or(d.samples),
        seed: o.u64("seed").unwrap_or(d.seed),
        batch: o.usize("batch").unwrap_or(d.batch),
        images: match o.string("images") {
            Some(folder) => rt(load_folder_images(Path::new(&folder), &session.job))?,
            None => vec![],
        },
        gen_steps: o.usize("steps").unwrap_or(d.gen_steps),
    };
    let prompts = strings_arg(prompts, "fisher_divergence")?;
    session.job.reset();
    let sd = &a.sd;
    let run = |variant: &Variant<'_>| {
        rt(fisher_divergence(
            sd,
            &Variant::Base,
            variant,
            &prompts,
            &fo,
            &session.job,
        ))
    };
    let result = if let Some(m) = b.clone().try_cast::<Model>() {
        run(&Variant::Weights(&m.sd.unet))?
    } else if b.is_string() {
        let unet = rt(unet_from_file(sd, Path::new(&b.to_string())))?;
        run(&Variant::Weights(&unet))?
    } else {
        let list: Vec<Dynamic> = match b.clone().try_cast::<ConceptVal>() {
            Some(c) => vec![Dynamic::from(c)],
            None => b.into_array().map_err(|t| {
                err(format!("fisher_divergence: the second variant is a model, a UNet file, a concept or an array of concepts, not {t}"))
            })?,
        };
        let mut set = ConceptSet::new();
        for c in list {
            let c = c
                .try_cast::<ConceptVal>()
                .ok_or_else(|| err("fisher_divergence: every element must be a concept"))?;
            set.insert(c.0, false);
        }
        run(&Variant::Concepts(&set))?
    };
    let mut m = Map::new();
    m.insert("mean".into(), Dynamic::from(result.mean as FLOAT));
    m.insert("std_err".into(), Dynamic::from(result.std_err as FLOAT));
    m.insert("samples".into(), Dynamic::from(result.samples as INT));
    Ok(m)
}

fn w2(spec: &FnSpec, a: Dynamic, b: Dynamic, opts: &Map, squared: bool) -> RhaiResult<FLOAT> {
    let o = Opts::of(opts, spec)?;
    let r = rt(wasserstein(
        &latents_arg(a, "latents_a")?,
        &latents_arg(b, "latents_b")?,
        o.usize("pool"),
    ))?;
    Ok(if squared { r.w2_squared } else { r.w2 })
}

/// Says so when a scorer loaded from `dir` has random weights (the bundled ones do).
fn load_clip(session: &Session, path: Option<&str>) -> RhaiResult<ClipVal> {
    let dir = path
        .map(PathBuf::from)
        .unwrap_or_else(crate::assets::tiny_clip);
    crate::metrics::warn_if_random("CLIP", &dir, &session.job);
    let tok = crate::assets::clip_tokenizer();
    Ok(ClipVal(Arc::new(rt(Clip::load(
        &dir,
        &tok,
        &device(session)?,
    ))?)))
}

fn load_dino(session: &Session, path: Option<&str>) -> RhaiResult<DinoVal> {
    let dir = path
        .map(PathBuf::from)
        .unwrap_or_else(crate::assets::tiny_dino);
    crate::metrics::warn_if_random("DINO", &dir, &session.job);
    Ok(DinoVal(Arc::new(rt(Dino::load(&dir, &device(session)?))?)))
}

/// The `clip` and `dino` of an options map, or the bundled tiny ones.
fn scorers(session: &Session, o: &Opts) -> RhaiResult<(ClipVal, DinoVal)> {
    let clip = match o.get("clip").and_then(|c| c.try_cast::<ClipVal>()) {
        Some(c) => c,
        None => load_clip(session, None)?,
    };
    let dino = match o.get("dino").and_then(|c| c.try_cast::<DinoVal>()) {
        Some(c) => c,
        None => load_dino(session, None)?,
    };
    Ok((clip, dino))
}

/// The `prompts`, `samples`, `steps`, `guidance`, `out`, `clip` and `dino` options
/// `evaluate` and `overtraining_curves` share.
fn evaluation_options(
    spec: FnSpec,
    prompts: Vec<String>,
    samples: usize,
    steps: usize,
    guidance: f64,
    out: &Path,
) -> FnSpec {
    spec.opt(
        "prompts",
        Kind::Strings,
        prompts,
        "prompts with {} for the concept, scored with CLIP-T, CLIP-I and DINO-I",
    )
    .opt(
        "samples",
        Kind::POSITIVE,
        samples as INT,
        "images per prompt",
    )
    .opt("steps", Kind::POSITIVE, steps as INT, "denoising steps")
    .opt("guidance", Kind::Float, guidance as FLOAT, "guidance scale")
    .opt(
        "out",
        Kind::Str,
        out.display().to_string(),
        "the output folder",
    )
    .opt_unset(
        "clip",
        Kind::Other("Clip"),
        "the CLIP to score with (load_clip; default: the bundled random one)",
    )
    .opt_unset(
        "dino",
        Kind::Other("Dino"),
        "the DINO to score with (load_dino; default: the bundled random one)",
    )
}

fn eval_spec() -> FnSpec {
    let d = EvalOptions::default();
    let spec = FnSpec::method("Model", "evaluate")
        .sig("model.evaluate(options) -> #{csv, table, markdown, images}")
        .doc("The paper's evaluation: every concept x every prompt ({} = the concept) x samples images, scored with CLIP-T, CLIP-I and DINO-I, written to OUT/scores.csv (per image) and OUT/table.md (per concept, with its storage). Resumable: run it again after an interruption and it skips what is done.")
        .opt_unset("concepts", Kind::Other("array of #{file, images}"), "the concept files and their training-image folders (required)")
        .opt("seed", Kind::SEED, d.seed as INT, "image i of each prompt uses seed + i")
        .opt("force", Kind::Bool, d.force, "use concepts trained on another model")
        .example("let r = m.evaluate(#{concepts: [#{file: \"pot.safetensors\", images: \"photos/pot\"}], prompts: [\"a {} in the snow\"], samples: 4}); print(r.markdown);");
    evaluation_options(
        spec,
        d.prompts,
        d.images_per_prompt,
        d.steps,
        d.guidance,
        &d.out_dir,
    )
}

fn eval_concepts(v: Option<Dynamic>) -> RhaiResult<Vec<EvalConcept>> {
    let entry = [
        OptSpec {
            name: "file",
            kind: Kind::Str,
            default: None,
            doc: "the concept file".into(),
        },
        OptSpec {
            name: "images",
            kind: Kind::Str,
            default: None,
            doc: "its training images".into(),
        },
    ];
    v.ok_or_else(|| err("evaluate: `concepts` is required: [#{file, images}, ...]"))?
        .into_array()
        .map_err(|_| err("evaluate: `concepts` must be an array of #{file, images}"))?
        .into_iter()
        .map(|c| {
            let m = c
                .try_cast::<Map>()
                .ok_or_else(|| err("evaluate: each concept is #{file, images}"))?;
            let co = Opts::new(&m, "evaluate concept", &entry)?;
            let field = |k: &str| {
                co.string(k)
                    .map(PathBuf::from)
                    .ok_or_else(|| err(format!("evaluate: a concept lacks `{k}`")))
            };
            Ok(EvalConcept {
                file: field("file")?,
                images: field("images")?,
            })
        })
        .collect()
}

fn run_eval(session: &Session, spec: &FnSpec, model: &Model, opts: &Map) -> RhaiResult<Map> {
    let o = Opts::of(opts, spec)?;
    let d = EvalOptions::default();
    let concepts = eval_concepts(o.get("concepts"))?;
    let (clip, dino) = scorers(session, &o)?;
    let eo = EvalOptions {
        prompts: o.strings("prompts").unwrap_or(d.prompts),
        images_per_prompt: o.usize("samples").unwrap_or(d.images_per_prompt),
        steps: o.usize("steps").unwrap_or(d.steps),
        guidance: o.float("guidance").unwrap_or(d.guidance),
        seed: o.u64("seed").unwrap_or(d.seed),
        out_dir: o.string("out").map(PathBuf::from).unwrap_or(d.out_dir),
        force: o.bool("force").unwrap_or(false),
    };
    session.job.reset();
    let r = rt(evaluate(
        &model.sd,
        &clip.0,
        &dino.0,
        &concepts,
        &eo,
        &session.job,
        &mut |_| Ok(()),
    ))?;
    let mut m = Map::new();
    m.insert("csv".into(), Dynamic::from(r.csv.display().to_string()));
    m.insert("table".into(), Dynamic::from(r.table.display().to_string()));
    m.insert("markdown".into(), Dynamic::from(r.markdown));
    m.insert("images".into(), Dynamic::from(r.rows.len() as INT));
    Ok(m)
}

fn curves_spec() -> FnSpec {
    let d = CurveOptions::default();
    let t = TrainOptions::default();
    let checkpoints: Vec<INT> = d.checkpoints.iter().map(|&c| c as INT).collect();
    let fisher_prompts = d.fisher_prompts.clone();
    let spec = FnSpec::method("Model", "overtraining_curves")
        .sig("model.overtraining_curves(folder, name, word) -> #{csv, chart, chart_path, points}")
        .sig("model.overtraining_curves(folder, name, word, options) -> #{csv, chart, chart_path, points}")
        .doc("Trains a concept and measures, at each checkpoint step, the latent Fisher divergence, W2 between base and customized latents, CLIP-T, CLIP-I and DINO-I (the paper's figures 10 and 11); writes a CSV and a chart (chart is an image to show).")
        .opt("checkpoints", Kind::Other("array of training steps"), checkpoints, "training steps at which to measure")
        .opt("lr", Kind::Float, t.lr as FLOAT, "AdamW's learning rate")
        .opt("batch", Kind::POSITIVE, t.batch as INT, "images per training step")
        .opt("seed", Kind::SEED, t.seed as INT, "the training seed")
        .opt("fisher_prompts", Kind::Strings, fisher_prompts, "prompts without the concept, for the Fisher divergence")
        .opt("fisher_samples", Kind::POSITIVE, d.fisher_samples as INT, "Fisher divergence samples")
        .opt("w2_samples", Kind::Int { min: 2, max: INT::MAX }, d.w2_samples as INT, "images per side for W2")
        .opt_unset("w2_pool", Kind::POSITIVE, "average-pool latents by this factor before W2")
        .example("let c = m.overtraining_curves(\"photos/pot\", \"pot\", \"teapot\", #{checkpoints: [100, 200, 400]}); show(c.chart);");
    evaluation_options(
        spec,
        d.eval_prompts,
        d.images_per_prompt,
        d.steps,
        d.guidance,
        &d.out_dir,
    )
}

fn checkpoints_arg(v: Option<Dynamic>, default: Vec<usize>) -> RhaiResult<Vec<usize>> {
    let Some(v) = v else {
        return Ok(default);
    };
    v.into_array()
        .map_err(|_| err("overtraining_curves: `checkpoints` is an array of step counts"))?
        .into_iter()
        .map(|x| {
            x.as_int()
                .ok()
                .filter(|&i| i >= 0)
                .map(|i| i as usize)
                .ok_or_else(|| {
                    err("overtraining_curves: `checkpoints` are step counts (integers >= 0)")
                })
        })
        .collect()
}

fn curve_points(points: &[crate::metrics::curves::CurvePoint]) -> Array {
    points
        .iter()
        .map(|p| {
            let mut m = Map::new();
            m.insert("step".into(), Dynamic::from(p.step as INT));
            m.insert("fisher".into(), Dynamic::from(p.fisher));
            m.insert("w2".into(), Dynamic::from(p.w2));
            m.insert("clip_t".into(), Dynamic::from(p.clip_t));
            m.insert("clip_i".into(), Dynamic::from(p.clip_i));
            m.insert("dino_i".into(), Dynamic::from(p.dino_i));
            Dynamic::from(m)
        })
        .collect()
}

fn run_curves(
    session: &Session,
    spec: &FnSpec,
    model: &Model,
    (folder, name, word): (&str, &str, &str),
    opts: &Map,
) -> RhaiResult<Map> {
    let o = Opts::of(opts, spec)?;
    let d = CurveOptions::default();
    let td = TrainOptions::default();
    let co = CurveOptions {
        checkpoints: checkpoints_arg(o.get("checkpoints"), d.checkpoints.clone())?,
        train: TrainOptions {
            lr: o.float("lr").unwrap_or(td.lr),
            batch: o.usize("batch").unwrap_or(td.batch),
            seed: o.u64("seed").unwrap_or(td.seed),
            ..td
        },
        fisher_prompts: o.strings("fisher_prompts").unwrap_or(d.fisher_prompts),
        fisher_samples: o.usize("fisher_samples").unwrap_or(d.fisher_samples),
        w2_samples: o.usize("w2_samples").unwrap_or(d.w2_samples),
        w2_pool: o.usize("w2_pool"),
        eval_prompts: o.strings("prompts").unwrap_or(d.eval_prompts),
        images_per_prompt: o.usize("samples").unwrap_or(d.images_per_prompt),
        steps: o.usize("steps").unwrap_or(d.steps),
        guidance: o.float("guidance").unwrap_or(d.guidance),
        out_dir: o.string("out").map(PathBuf::from).unwrap_or(d.out_dir),
    };
    let (clip, dino) = scorers(session, &o)?;
    let images: Vec<_> = rt(load_folder_images(Path::new(folder), &session.job))?;
    session.job.reset();
    let c = rt(overtraining_curves(
        &model.sd,
        &clip.0,
        &dino.0,
        &images,
        name,
        word,
        &co,
        &session.job,
    ))?;
    let mut m = Map::new();
    m.insert("csv".into(), Dynamic::from(c.csv.display().to_string()));
    m.insert("chart".into(), Dynamic::from(Img::new(c.chart_image)));
    m.insert(
        "chart_path".into(),
        Dynamic::from(c.chart.display().to_string()),
    );
    m.insert("points".into(), Dynamic::from(curve_points(&c.points)));
    Ok(m)
}

fn register_distances(api: &mut Api, session: &Arc<Session>) {
    let spec = api.declare(fisher_spec());
    let (s, sp) = (session.clone(), spec.clone());
    api.func(&spec, move |a: &mut Model, b: Dynamic, prompts: Dynamic| {
        fisher(&s, &sp, a, b, prompts, &Map::new())
    });
    let (s, sp) = (session.clone(), spec.clone());
    api.func(
        &spec,
        move |a: &mut Model, b: Dynamic, prompts: Dynamic, o: Map| {
            fisher(&s, &sp, a, b, prompts, &o)
        },
    );
    for (name, squared, doc) in [
        ("wasserstein", false, "The 2-Wasserstein (Frechet) distance between Gaussians fitted to two sets of samples (tensors [n, ...] or arrays of tensors), with unbiased covariances as FID, computed exactly in f64 without d x d matrices."),
        ("wasserstein2", true, "The squared 2-Wasserstein distance (see wasserstein)."),
    ] {
        let spec = api.declare(
            FnSpec::new(name)
                .sig(if squared { "wasserstein2(latents_a, latents_b) -> float" } else { "wasserstein(latents_a, latents_b) -> float" })
                .sig(if squared { "wasserstein2(latents_a, latents_b, options) -> float" } else { "wasserstein(latents_a, latents_b, options) -> float" })
                .doc(doc)
                .opt_unset("pool", Kind::POSITIVE, "average-pool [n, C, H, W] latents by this factor first")
                .example(if squared { "print(wasserstein2(a, b));" } else { "let w = wasserstein(base_latents, custom_latents);" }),
        );
        let sp = spec.clone();
        api.func(&spec, move |a: Dynamic, b: Dynamic| w2(&sp, a, b, &Map::new(), squared));
        let sp = spec.clone();
        api.func(&spec, move |a: Dynamic, b: Dynamic, o: Map| w2(&sp, a, b, &o, squared));
    }
}

fn register_scorers(api: &mut Api, session: &Arc<Session>) {
    api.ty::<ClipVal>(
        "Clip",
        "a CLIP model (load_clip): image and text embeddings",
    );
    api.ty::<DinoVal>("Dino", "a DINO ViT (load_dino): image embeddings");
    let spec = api.declare(
        FnSpec::new("load_clip")
            .sig("load_clip() -> Clip")
            .sig("load_clip(path) -> Clip")
            .doc("Loads a CLIP checkpoint folder in the Hugging Face layout (e.g. openai/clip-vit-base-patch32); without a path, the bundled tiny random one. Its preprocessing follows its preprocessor_config.json exactly (Pillow's bicubic resize, centre crop).")
            .example("let clip = load_clip(\"models/clip-vit-base-patch32\");"),
    );
    let s = session.clone();
    api.func(&spec, move || load_clip(&s, None));
    let s = session.clone();
    api.func(&spec, move |p: &str| load_clip(&s, Some(p)));
    let spec = api.declare(
        FnSpec::new("load_dino")
            .sig("load_dino() -> Dino")
            .sig("load_dino(path) -> Dino")
            .doc("Loads a DINO ViT checkpoint folder (e.g. facebook/dino-vits16); without a path, the bundled tiny random one.")
            .example("let dino = load_dino(\"models/dino-vits16\");"),
    );
    let s = session.clone();
    api.func(&spec, move || load_dino(&s, None));
    let s = session.clone();
    api.func(&spec, move |p: &str| load_dino(&s, Some(p)));
    let spec = api.declare(
        FnSpec::method("Clip", "image_embeds")
            .sig("clip.image_embeds(images) -> Tensor")
            .doc("CLIP image embeddings [n, projection], of an array of images or a folder.")
            .example("let e = clip.image_embeds([g.custom]);"),
    );
    api.func(
        &spec,
        |c: &mut ClipVal, images: Dynamic| -> RhaiResult<TensorVal> {
            Ok(TensorVal::new(rt(c
                .0
                .image_embeds(&images_arg(images, "image_embeds")?))?))
        },
    );
    let spec = api.declare(
        FnSpec::method("Clip", "text_embeds")
            .sig("clip.text_embeds(prompts) -> Tensor")
            .doc("CLIP text embeddings [n, projection] of a prompt or an array of prompts.")
            .example("let t = clip.text_embeds([\"a photo of a cat\"]);"),
    );
    api.func(
        &spec,
        |c: &mut ClipVal, prompts: Dynamic| -> RhaiResult<TensorVal> {
            let p = strings_arg(prompts, "text_embeds")?;
            Ok(TensorVal::new(rt(c.0.text_embeds(
                &p.iter().map(String::as_str).collect::<Vec<_>>(),
            ))?))
        },
    );
    let spec = api.declare(
        FnSpec::method("Dino", "embeds")
            .sig("dino.embeds(images) -> Tensor")
            .doc("DINO embeddings (the CLS token) [n, hidden], of an array of images or a folder.")
            .example("let e = dino.embeds(\"photos/mycat\");"),
    );
    api.func(
        &spec,
        |d: &mut DinoVal, images: Dynamic| -> RhaiResult<TensorVal> {
            Ok(TensorVal::new(rt(d
                .0
                .embeds(&images_arg(images, "embeds")?))?))
        },
    );
}

fn register_scores(api: &mut Api) {
    let spec = api.declare(
        FnSpec::new("clip_t")
            .sig("clip_t(clip, images, prompts) -> float")
            .doc("CLIP-T: the mean cosine between each image and its prompt (one prompt for all, or one per image). Pass prompts as the base model sees them (g.base_prompt), without <> marks.")
            .example("print(clip_t(clip, [g.custom], [g.base_prompt]));"),
    );
    api.func(
        &spec,
        |c: ClipVal, images: Dynamic, prompts: Dynamic| -> RhaiResult<FLOAT> {
            let p = strings_arg(prompts, "clip_t")?;
            rt(scores::clip_t(
                &c.0,
                &images_arg(images, "clip_t")?,
                &p.iter().map(String::as_str).collect::<Vec<_>>(),
            ))
        },
    );
    let spec = api.declare(
        FnSpec::new("clip_i")
            .sig("clip_i(clip, images, references) -> float")
            .doc("CLIP-I: the mean cosine between generated images and the concept's training images (an array or a folder).")
            .example("print(clip_i(clip, [g.custom], \"photos/mycat\"));"),
    );
    api.func(
        &spec,
        |c: ClipVal, images: Dynamic, refs: Dynamic| -> RhaiResult<FLOAT> {
            rt(scores::clip_i(
                &c.0,
                &images_arg(images, "clip_i")?,
                &images_arg(refs, "clip_i")?,
            ))
        },
    );
    let spec = api.declare(
        FnSpec::new("dino_i")
            .sig("dino_i(dino, images, references) -> float")
            .doc("DINO-I: the mean cosine of DINO embeddings between generated images and the training images.")
            .example("print(dino_i(dino, [g.custom], \"photos/mycat\"));"),
    );
    api.func(
        &spec,
        |d: DinoVal, images: Dynamic, refs: Dynamic| -> RhaiResult<FLOAT> {
            rt(scores::dino_i(
                &d.0,
                &images_arg(images, "dino_i")?,
                &images_arg(refs, "dino_i")?,
            ))
        },
    );
}

fn register_runners(api: &mut Api, session: &Arc<Session>) {
    let spec = api.declare(eval_spec());
    let (s, sp) = (session.clone(), spec.clone());
    api.func(&spec, move |m: &mut Model, o: Map| run_eval(&s, &sp, m, &o));
    let spec = api.declare(curves_spec());
    let (s, sp) = (session.clone(), spec.clone());
    api.func(
        &spec,
        move |m: &mut Model, folder: &str, name: &str, word: &str| {
            run_curves(&s, &sp, m, (folder, name, word), &Map::new())
        },
    );
    let (s, sp) = (session.clone(), spec.clone());
    api.func(
        &spec,
        move |m: &mut Model, folder: &str, name: &str, word: &str, o: Map| {
            run_curves(&s, &sp, m, (folder, name, word), &o)
        },
    );
}

pub fn register(api: &mut Api, session: &Arc<Session>) {
    register_distances(api, session);
    register_scorers(api, session);
    register_scores(api);
    register_runners(api, session);
}
