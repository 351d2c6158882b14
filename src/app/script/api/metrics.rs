//! The metrics in scripts: Fisher divergence, W2, CLIP/DINO scores, the evaluation runner and
//! over-training curves.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Tensor;
use image::RgbImage;
use rhai::{Array, Dynamic, Engine, Map, FLOAT, INT};

use super::concepts::ConceptVal;
use super::images::Img;
use super::model::Model;
use super::tensors::TensorVal;
use super::volatile;
use crate::app::script::{err, rt, Opts, RhaiResult, Session};
use crate::infusion::concept::ConceptSet;
use crate::infusion::train::TrainOptions;
use crate::metrics::clip::Clip;
use crate::metrics::curves::{overtraining_curves, CurveOptions};
use crate::metrics::dino::Dino;
use crate::metrics::eval::{evaluate, EvalConcept, EvalOptions};
use crate::metrics::fisher::{fisher_divergence, unet_from_file, FisherOptions, Variant};
use crate::metrics::scores;
use crate::metrics::w2::wasserstein;
use crate::util::image_io::load_folder_images;

/// A loaded CLIP model (cheap to clone).
#[derive(Clone)]
pub struct ClipVal(pub Arc<Clip>);

/// A loaded DINO model (cheap to clone).
#[derive(Clone)]
pub struct DinoVal(pub Arc<Dino>);

fn device(session: &Session) -> RhaiResult<candle_core::Device> {
    rt(crate::sd::device::parse_device(&session.config.device))
}

/// Images from an array of images, or a folder path.
fn images_arg(v: Dynamic, what: &str) -> RhaiResult<Vec<RgbImage>> {
    if v.is_string() {
        let folder = v.to_string();
        return rt(load_folder_images(Path::new(&folder)));
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

fn fisher(
    session: &Session,
    a: &Model,
    b: Dynamic,
    prompts: Dynamic,
    opts: &Map,
) -> RhaiResult<Map> {
    let o = Opts::new(
        opts,
        "fisher_divergence",
        &["samples", "seed", "batch", "images", "gen_steps"],
    )?;
    let d = FisherOptions::default();
    let fo = FisherOptions {
        samples: o.usize("samples")?.unwrap_or(d.samples),
        seed: o.int("seed")?.map(|s| s as u64).unwrap_or(d.seed),
        batch: o.usize("batch")?.unwrap_or(d.batch),
        images: match o.string("images")? {
            Some(folder) => rt(load_folder_images(Path::new(&folder)))?,
            None => vec![],
        },
        gen_steps: o.usize("gen_steps")?.unwrap_or(d.gen_steps),
    };
    let prompts = strings_arg(prompts, "fisher_divergence")?;
    session.job.reset();
    let sd = &a.sd;
    let result = if let Some(m) = b.clone().try_cast::<Model>() {
        rt(fisher_divergence(
            sd,
            &Variant::Base,
            &Variant::Weights(&m.sd.unet),
            &prompts,
            &fo,
            &session.job,
        ))?
    } else if b.is_string() {
        let unet = rt(unet_from_file(sd, Path::new(&b.to_string())))?;
        rt(fisher_divergence(
            sd,
            &Variant::Base,
            &Variant::Weights(&unet),
            &prompts,
            &fo,
            &session.job,
        ))?
    } else {
        let list: Vec<Dynamic> = match b.clone().try_cast::<ConceptVal>() {
            Some(c) => vec![Dynamic::from(c)],
            None => b
                .into_array()
                .map_err(|t| err(format!("fisher_divergence: the second variant is a model, a UNet file, a concept or an array of concepts, not {t}")))?,
        };
        let mut set = ConceptSet::new();
        for c in list {
            let c = c
                .try_cast::<ConceptVal>()
                .ok_or_else(|| err("fisher_divergence: every element must be a concept"))?;
            set.insert((*c.0).clone(), false);
        }
        rt(fisher_divergence(
            sd,
            &Variant::Base,
            &Variant::Concepts(&set),
            &prompts,
            &fo,
            &session.job,
        ))?
    };
    let mut m = Map::new();
    m.insert("mean".into(), Dynamic::from(result.mean as FLOAT));
    m.insert("std_err".into(), Dynamic::from(result.std_err as FLOAT));
    m.insert("samples".into(), Dynamic::from(result.samples as INT));
    Ok(m)
}

fn w2(a: Dynamic, b: Dynamic, opts: &Map, squared: bool) -> RhaiResult<FLOAT> {
    let o = Opts::new(opts, "wasserstein", &["pool"])?;
    let r = rt(wasserstein(
        &latents_arg(a, "latents_a")?,
        &latents_arg(b, "latents_b")?,
        o.usize("pool")?,
    ))?;
    Ok(if squared { r.w2_squared } else { r.w2 })
}

fn load_clip(session: &Session, path: Option<&str>) -> RhaiResult<ClipVal> {
    let dir = path
        .map(PathBuf::from)
        .unwrap_or_else(crate::assets::tiny_clip);
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
    Ok(DinoVal(Arc::new(rt(Dino::load(&dir, &device(session)?))?)))
}

/// The `clip` and `dino` of an options map, or the bundled tiny ones.
fn scorers(session: &Session, opts: &Map) -> RhaiResult<(ClipVal, DinoVal)> {
    let clip = match opts
        .get("clip")
        .and_then(|c| c.clone().try_cast::<ClipVal>())
    {
        Some(c) => c,
        None => load_clip(session, None)?,
    };
    let dino = match opts
        .get("dino")
        .and_then(|c| c.clone().try_cast::<DinoVal>())
    {
        Some(c) => c,
        None => load_dino(session, None)?,
    };
    Ok((clip, dino))
}

fn run_eval(session: &Session, model: &Model, opts: &Map) -> RhaiResult<Map> {
    let o = Opts::new(
        opts,
        "evaluate",
        &[
            "concepts", "prompts", "n", "steps", "guidance", "seed", "out", "clip", "dino", "force",
        ],
    )?;
    let d = EvalOptions::default();
    let concepts = opts
        .get("concepts")
        .cloned()
        .ok_or_else(|| err("evaluate: `concepts` is required: [#{file, images}, ...]"))?
        .into_array()
        .map_err(|_| err("evaluate: `concepts` must be an array of #{file, images}"))?
        .into_iter()
        .map(|c| {
            let m = c
                .try_cast::<Map>()
                .ok_or_else(|| err("evaluate: each concept is #{file, images}"))?;
            let co = Opts::new(&m, "evaluate concept", &["file", "images"])?;
            Ok(EvalConcept {
                file: PathBuf::from(
                    co.string("file")?
                        .ok_or_else(|| err("evaluate: a concept lacks `file`"))?,
                ),
                images: PathBuf::from(
                    co.string("images")?
                        .ok_or_else(|| err("evaluate: a concept lacks `images`"))?,
                ),
            })
        })
        .collect::<RhaiResult<Vec<_>>>()?;
    let (clip, dino) = scorers(session, opts)?;
    let eo = EvalOptions {
        prompts: o.strings("prompts")?.unwrap_or(d.prompts),
        images_per_prompt: o.usize("n")?.unwrap_or(d.images_per_prompt),
        steps: o.usize("steps")?.unwrap_or(d.steps),
        guidance: o.float("guidance")?.unwrap_or(d.guidance),
        seed: o.int("seed")?.map(|s| s as u64).unwrap_or(d.seed),
        out_dir: o.string("out")?.map(PathBuf::from).unwrap_or(d.out_dir),
        force: o.bool("force")?.unwrap_or(false),
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

fn run_curves(
    session: &Session,
    model: &Model,
    folder: &str,
    name: &str,
    word: &str,
    opts: &Map,
) -> RhaiResult<Map> {
    let o = Opts::new(
        opts,
        "overtraining_curves",
        &[
            "checkpoints",
            "lr",
            "batch",
            "seed",
            "fisher_prompts",
            "fisher_samples",
            "w2_samples",
            "w2_pool",
            "prompts",
            "n",
            "steps",
            "guidance",
            "out",
            "clip",
            "dino",
        ],
    )?;
    let d = CurveOptions::default();
    let checkpoints = match opts.get("checkpoints") {
        None => d.checkpoints.clone(),
        Some(v) => v
            .clone()
            .into_array()
            .map_err(|_| err("overtraining_curves: `checkpoints` is an array of step counts"))?
            .into_iter()
            .map(|x| {
                x.as_int()
                    .ok()
                    .filter(|&i| i >= 0)
                    .map(|i| i as usize)
                    .ok_or_else(|| err("overtraining_curves: `checkpoints` are step counts"))
            })
            .collect::<RhaiResult<Vec<_>>>()?,
    };
    let td = TrainOptions::default();
    let co = CurveOptions {
        checkpoints,
        train: TrainOptions {
            lr: o.float("lr")?.unwrap_or(td.lr),
            batch: o.usize("batch")?.unwrap_or(td.batch),
            seed: o.int("seed")?.map(|s| s as u64).unwrap_or(td.seed),
            ..td
        },
        fisher_prompts: o.strings("fisher_prompts")?.unwrap_or(d.fisher_prompts),
        fisher_samples: o.usize("fisher_samples")?.unwrap_or(d.fisher_samples),
        w2_samples: o.usize("w2_samples")?.unwrap_or(d.w2_samples),
        w2_pool: o.usize("w2_pool")?,
        eval_prompts: o.strings("prompts")?.unwrap_or(d.eval_prompts),
        images_per_prompt: o.usize("n")?.unwrap_or(d.images_per_prompt),
        steps: o.usize("steps")?.unwrap_or(d.steps),
        guidance: o.float("guidance")?.unwrap_or(d.guidance),
        out_dir: o.string("out")?.map(PathBuf::from).unwrap_or(d.out_dir),
    };
    let (clip, dino) = scorers(session, opts)?;
    let images: Vec<_> = rt(load_folder_images(Path::new(folder)))?;
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
    let rows: Array = c
        .points
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
        .collect();
    let mut m = Map::new();
    m.insert("csv".into(), Dynamic::from(c.csv.display().to_string()));
    m.insert("chart".into(), Dynamic::from(Img::new(c.chart_image)));
    m.insert(
        "chart_path".into(),
        Dynamic::from(c.chart.display().to_string()),
    );
    m.insert("points".into(), Dynamic::from(rows));
    Ok(m)
}

pub fn register(engine: &mut Engine, session: &Arc<Session>) {
    engine.register_type_with_name::<ClipVal>("Clip");
    engine.register_type_with_name::<DinoVal>("Dino");
    engine.register_fn("to_string", |c: &mut ClipVal| {
        format!("Clip({})", c.0.path().display())
    });
    engine.register_fn("to_string", |d: &mut DinoVal| {
        format!("Dino({})", d.0.path().display())
    });

    let s = session.clone();
    volatile!(
        engine,
        "fisher_divergence",
        move |a: &mut Model, b: Dynamic, prompts: Dynamic| {
            fisher(&s, a, b, prompts, &Map::new())
        }
    );
    let s = session.clone();
    volatile!(
        engine,
        "fisher_divergence",
        move |a: &mut Model, b: Dynamic, prompts: Dynamic, o: Map| {
            fisher(&s, a, b, prompts, &o)
        }
    );
    engine.register_fn("wasserstein", |a: Dynamic, b: Dynamic| {
        w2(a, b, &Map::new(), false)
    });
    engine.register_fn("wasserstein", |a: Dynamic, b: Dynamic, o: Map| {
        w2(a, b, &o, false)
    });
    engine.register_fn("wasserstein2", |a: Dynamic, b: Dynamic| {
        w2(a, b, &Map::new(), true)
    });
    engine.register_fn("wasserstein2", |a: Dynamic, b: Dynamic, o: Map| {
        w2(a, b, &o, true)
    });

    let s = session.clone();
    volatile!(engine, "load_clip", move || load_clip(&s, None));
    let s = session.clone();
    volatile!(engine, "load_clip", move |p: &str| load_clip(&s, Some(p)));
    let s = session.clone();
    volatile!(engine, "load_dino", move || load_dino(&s, None));
    let s = session.clone();
    volatile!(engine, "load_dino", move |p: &str| load_dino(&s, Some(p)));

    engine.register_fn(
        "image_embeds",
        |c: &mut ClipVal, images: Dynamic| -> RhaiResult<TensorVal> {
            Ok(TensorVal::new(rt(c
                .0
                .image_embeds(&images_arg(images, "image_embeds")?))?))
        },
    );
    engine.register_fn(
        "text_embeds",
        |c: &mut ClipVal, prompts: Dynamic| -> RhaiResult<TensorVal> {
            let p = strings_arg(prompts, "text_embeds")?;
            Ok(TensorVal::new(rt(c.0.text_embeds(
                &p.iter().map(String::as_str).collect::<Vec<_>>(),
            ))?))
        },
    );
    engine.register_fn(
        "embeds",
        |d: &mut DinoVal, images: Dynamic| -> RhaiResult<TensorVal> {
            Ok(TensorVal::new(rt(d
                .0
                .embeds(&images_arg(images, "embeds")?))?))
        },
    );
    engine.register_fn(
        "clip_t",
        |c: ClipVal, images: Dynamic, prompts: Dynamic| -> RhaiResult<FLOAT> {
            let p = strings_arg(prompts, "clip_t")?;
            rt(scores::clip_t(
                &c.0,
                &images_arg(images, "clip_t")?,
                &p.iter().map(String::as_str).collect::<Vec<_>>(),
            ))
        },
    );
    engine.register_fn(
        "clip_i",
        |c: ClipVal, images: Dynamic, refs: Dynamic| -> RhaiResult<FLOAT> {
            rt(scores::clip_i(
                &c.0,
                &images_arg(images, "clip_i")?,
                &images_arg(refs, "clip_i")?,
            ))
        },
    );
    engine.register_fn(
        "dino_i",
        |d: DinoVal, images: Dynamic, refs: Dynamic| -> RhaiResult<FLOAT> {
            rt(scores::dino_i(
                &d.0,
                &images_arg(images, "dino_i")?,
                &images_arg(refs, "dino_i")?,
            ))
        },
    );

    let s = session.clone();
    volatile!(engine, "evaluate", move |m: &mut Model, o: Map| run_eval(
        &s, m, &o
    ));
    let s = session.clone();
    volatile!(
        engine,
        "overtraining_curves",
        move |m: &mut Model, folder: &str, name: &str, word: &str| {
            run_curves(&s, m, folder, name, word, &Map::new())
        }
    );
    let s = session.clone();
    volatile!(
        engine,
        "overtraining_curves",
        move |m: &mut Model, folder: &str, name: &str, word: &str, o: Map| {
            run_curves(&s, m, folder, name, word, &o)
        }
    );
}
