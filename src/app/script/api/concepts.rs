//! Concepts in scripts: train, load, save, list. Every concept trained or loaded joins the
//! session and is found by its `<name>` in prompts.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::DType;
use rhai::{Array, Dynamic, Map, INT};

use super::model::Model;
use super::{json_to_dynamic, Api};
use crate::actions::{self, TrainEnd, TrainRequest};
use crate::app::script::docs::{FnSpec, Kind};
use crate::app::script::{err, rt, Opts, RhaiResult, Session};
use crate::infusion::concept::Concept;
use crate::methods::adapted::{Adapted, Change};
use crate::train::{TrainOptions, DEFAULT_TEMPLATES};

/// A concept value (cheap to clone): Infusion's, or another method's.
#[derive(Debug, Clone)]
pub enum ConceptVal {
    Infusion(Arc<Concept>),
    Adapted(Arc<Adapted>),
}

impl ConceptVal {
    fn name(&self) -> &str {
        match self {
            ConceptVal::Infusion(c) => &c.name,
            ConceptVal::Adapted(a) => &a.name,
        }
    }

    fn word(&self) -> &str {
        match self {
            ConceptVal::Infusion(c) => &c.word,
            ConceptVal::Adapted(a) => &a.word,
        }
    }

    fn method(&self) -> &'static str {
        match self {
            ConceptVal::Infusion(_) => "infusion",
            ConceptVal::Adapted(a) => a.method(),
        }
    }

    /// Bytes of its learned tensors (f32).
    fn size_bytes(&self) -> usize {
        match self {
            ConceptVal::Infusion(c) => c.n_values() * 4,
            ConceptVal::Adapted(a) => a.size_bytes(),
        }
    }

    /// The Infusion concept, or an error that says what `what` needs.
    pub fn infusion(&self, what: &str) -> Result<&Arc<Concept>, String> {
        match self {
            ConceptVal::Infusion(c) => Ok(c),
            ConceptVal::Adapted(a) => Err(format!(
                "{what} takes Infusion concepts; <{}> is a {} concept",
                a.name,
                a.method()
            )),
        }
    }
}

impl std::fmt::Display for ConceptVal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConceptVal::Infusion(c) => write!(
                f,
                "Concept(<{}> = {}, infusion, {} layers, {} values)",
                c.name,
                c.word,
                c.deltas.len(),
                c.n_values()
            ),
            ConceptVal::Adapted(a) => match &a.change {
                Change::TextualInversion(e) => write!(
                    f,
                    "Concept(<{}> = {}, textual_inversion, {} vector(s) of width {})",
                    a.name,
                    a.word,
                    e.vectors.dims()[0],
                    e.vectors.dims().get(1).copied().unwrap_or(0)
                ),
                Change::Lora {
                    lora,
                    scale,
                    trigger,
                } => write!(
                    f,
                    "Concept(<{}> = {}{}, lora, {} layers, scale {scale})",
                    a.name,
                    trigger
                        .as_deref()
                        .map(|t| format!("{t} "))
                        .unwrap_or_default(),
                    a.word,
                    lora.layers.len()
                ),
                Change::DreamBooth { unet, trigger } => write!(
                    f,
                    "Concept(<{}> = {trigger} {}, dreambooth, {} parameters)",
                    a.name, a.word, unet.n_params
                ),
            },
        }
    }
}

fn add(session: &Session, concept: Arc<Concept>) -> ConceptVal {
    session
        .concepts
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .add(concept.clone(), false, &session.job);
    ConceptVal::Infusion(concept)
}

fn train_spec() -> FnSpec {
    let d = TrainOptions::default();
    FnSpec::method("Model", "train_concept")
        .sig("model.train_concept(folder, name, word) -> Concept")
        .sig("model.train_concept(folder, name, word, options) -> Concept")
        .doc("Trains a concept from a folder of 3-20 images: its name (prompts say <name>) and its class word, by Infusion (the paper's settings by default: AdamW on the residuals only), Textual Inversion (a new word's vectors, from the class word's) or DreamBooth-LoRA (rank-4 factors on the attention projections, prompts saying `trigger word`), as diffusers' training scripts do. Ctrl-C stops and keeps what was learned; the concept joins the session either way.")
        .opt("method", Kind::Choice(&actions::Method::NAMES), "infusion", "infusion, textual_inversion, lora or dreambooth (the whole UNet)")
        .opt_unset("train_steps", Kind::POSITIVE, "training steps (default: 500; textual_inversion 3000, diffusers' example)")
        .opt_unset("lr", Kind::Float, "AdamW's learning rate (default: infusion 0.01, textual_inversion 5e-4 x batch, lora 1e-4, dreambooth 5e-6)")
        .opt("rank", Kind::POSITIVE, 4 as INT, "lora: the rank of its factors")
        .opt("trigger", Kind::Str, "sks", "lora, dreambooth: the identifier prompts put before the class word")
        .opt("prior", Kind::Bool, false, "lora, dreambooth: prior preservation with class images the model makes of \"a photo of a WORD\"")
        .opt("prior_images", Kind::POSITIVE, 100 as INT, "how many class images prior preservation makes")
        .opt("prior_weight", Kind::Float, 1.0, "the weight of the class images' loss")
        .opt_unset("prior_dir", Kind::Str, "a folder to keep the class images in and take them from next time (default: made each run)")
        .opt("batch", Kind::POSITIVE, d.batch as INT, "images per step")
        .opt("seed", Kind::SEED, d.seed as INT, "seed of every random draw (images, timesteps, noise)")
        .opt("templates", Kind::Strings, d.templates.clone(), "prompt templates, {} for the class word")
        .opt("flip", Kind::Bool, d.flip, "also train on the mirror images")
        .opt_unset("checkpoint_every", Kind::POSITIVE, "write a resumable checkpoint every N steps")
        .opt_unset("checkpoint_dir", Kind::Str, "where checkpoints go (default: NAME-checkpoints/ in the working folder)")
        .opt_unset("resume", Kind::Str, "continue the run of this checkpoint (its method and settings; train_steps is the new total, default the run's)")
        .example("let cat = m.train_concept(\"photos/mycat\", \"mycat\", \"cat\", #{train_steps: 400}); cat.save(\"mycat.safetensors\");")
}

fn train(
    session: &Session,
    spec: &FnSpec,
    model: &Model,
    (folder, name, word): (&str, &str, &str),
    opts: &Map,
) -> RhaiResult<ConceptVal> {
    let o = Opts::of(opts, spec)?;
    let d = TrainOptions::default();
    let mut method = rt(actions::Method::parse(
        &o.string("method").unwrap_or_else(|| "infusion".into()),
        o.usize("rank").unwrap_or(4),
        &o.string("trigger").unwrap_or_else(|| "sks".into()),
    ))?;
    let resume = o.string("resume").map(PathBuf::from);
    let mut steps = method.default_steps();
    if let Some(path) = &resume {
        let asked = o.given("method").then_some(&method);
        let (m, ckpt) = rt(actions::resumed_method(path, asked))?;
        (method, steps) = (m, ckpt.options.steps);
    }
    let batch = o.usize("batch").unwrap_or(d.batch);
    let req = TrainRequest {
        folder: PathBuf::from(folder),
        name: name.to_string(),
        word: word.to_string(),
        options: TrainOptions {
            steps: o.usize("train_steps").unwrap_or(steps),
            lr: o.float("lr").unwrap_or(method.default_lr(batch)),
            batch,
            seed: o.u64("seed").unwrap_or(d.seed),
            templates: o.strings("templates").unwrap_or(d.templates),
            flip: o.bool("flip").unwrap_or(d.flip),
            checkpoint_every: o.usize("checkpoint_every"),
            checkpoint_dir: o.string("checkpoint_dir").map(PathBuf::from),
            weight_decay: d.weight_decay,
        },
        method,
        prior: o.bool("prior").unwrap_or(false).then(|| actions::Prior {
            images: o.usize("prior_images").unwrap_or(100),
            weight: o.float("prior_weight").unwrap_or(1.0),
            dir: o.string("prior_dir").map(PathBuf::from),
        }),
        resume,
        out: None,
        save_f32: false,
    };
    session.job.reset();
    let t = rt(actions::train_concept(&model.sd, &req, &session.job))?;
    // What was learned (or the last good state) joins the session whatever happened.
    let concept = match t.concept {
        actions::LoadedConcept::Infusion(c) => add(session, c),
        actions::LoadedConcept::Adapted(a) => {
            session
                .concepts
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .add_adapted(a.clone(), &session.job);
            ConceptVal::Adapted(a)
        }
    };
    match t.end {
        TrainEnd::Finished => {
            if let Some(l) = t.losses.last() {
                eprintln!("<{name}>: {} steps, loss {l:.5}", t.steps_done);
            }
            Ok(concept)
        }
        TrainEnd::Cancelled => {
            eprintln!(
                "stopped at step {}: <{name}> keeps what was learned",
                t.steps_done
            );
            if !session.config.interactive {
                // A recipe stops with the signal, what was learned saved first.
                let saved = match &concept {
                    ConceptVal::Infusion(c) => actions::save_stopped(
                        &actions::LoadedConcept::Infusion(c.clone()),
                        t.steps_done,
                    ),
                    ConceptVal::Adapted(a) => actions::save_stopped(
                        &actions::LoadedConcept::Adapted(a.clone()),
                        t.steps_done,
                    ),
                };
                match saved {
                    Ok(path) => eprintln!("<{name}> is saved as {}", path.display()),
                    Err(e) => eprintln!("error: {e}"),
                }
                return Err(Box::new(rhai::EvalAltResult::ErrorTerminated(
                    Dynamic::from("cancelled"),
                    rhai::Position::NONE,
                )));
            }
            session.job.reset();
            Ok(concept)
        }
        TrainEnd::Failed(e) => Err(err(format!("{e} (<{name}> keeps them)"))),
    }
}

fn load_spec() -> FnSpec {
    FnSpec::new("load_concept")
        .sig("load_concept(path) -> Concept")
        .sig("load_concept(path, options) -> Concept")
        .doc("Loads a concept file into the session, checked against the loaded model: ours (infusion-concept/1; one trained on another model is refused unless forced), a Textual Inversion embedding (diffusers' learned_embeds.safetensors or AUTOMATIC1111's) or a LoRA (diffusers', PEFT's or kohya's layout). The format is told from the tensors' names. Files this tool wrote record their name, class word and trigger, and those are the defaults; other tools' TI and LoRA files need the class word F sees. A diffusers unet/ folder (DreamBooth's result) loads as a concept whose C runs that UNet.")
        .opt("force", Kind::Bool, false, "use an Infusion concept even if it was trained on another model")
        .opt_unset("name", Kind::Str, "what prompts call it (default: the name the file records, else the embedding's token, the LoRA file's or folder's name, an Infusion concept's own)")
        .opt_unset("word", Kind::Str, "TI, LoRA, DreamBooth: the class word F sees in its place (default: the one the file records; required for other tools' files)")
        .opt_unset("scale", Kind::Float, "LoRA: its strength (default 1.0)")
        .opt_unset("trigger", Kind::Str, "LoRA, DreamBooth: the identifier C's prompt puts before the word, e.g. \"sks\" (default: the one the file records)")
        .example("load_concept(\"mycat.safetensors\"); load_concept(\"pot_lora.safetensors\", #{word: \"teapot\", trigger: \"sks\", scale: 0.8});")
}

fn load(session: &Session, spec: &FnSpec, path: &str, opts: &Map) -> RhaiResult<ConceptVal> {
    let o = Opts::of(opts, spec)?;
    let req = actions::ConceptRequest {
        path: PathBuf::from(path),
        name: o.string("name"),
        word: o.string("word"),
        scale: o.float("scale"),
        trigger: o.string("trigger"),
        force: o.bool("force").unwrap_or(false),
    };
    let model = session
        .model
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let loaded = rt(actions::load_concept(
        &req,
        model.as_ref().map(|m| &*m.sd),
        &mut session.concepts.write().unwrap_or_else(|e| e.into_inner()),
        &session.job,
    ))?;
    Ok(match loaded {
        actions::LoadedConcept::Infusion(c) => ConceptVal::Infusion(c),
        actions::LoadedConcept::Adapted(a) => ConceptVal::Adapted(a),
    })
}

fn save_spec() -> FnSpec {
    FnSpec::method("Concept", "save")
        .sig("concept.save(path) -> path")
        .sig("concept.save(path, options) -> path")
        .doc("Writes the concept as a safetensors file, atomically: Infusion's as infusion-concept/1, a learned word as diffusers' learned_embeds.safetensors, a LoRA as diffusers' save_lora_weights writes it (both load in diffusers).")
        .opt("dtype", Kind::Choice(&["f16", "f32"]), "f16", "Infusion: the residuals' precision")
        .example("cat.save(\"mycat.safetensors\"); cat.save(\"mycat-f32.safetensors\", #{dtype: \"f32\"});")
}

fn save(spec: &FnSpec, c: &ConceptVal, path: &str, opts: &Map) -> RhaiResult<String> {
    let o = Opts::of(opts, spec)?;
    let dtype = match o.string("dtype").as_deref() {
        Some("f32") => DType::F32,
        _ => DType::F16,
    };
    match c {
        ConceptVal::Infusion(c) => rt(c.save(Path::new(path), dtype))?,
        ConceptVal::Adapted(a) => rt(a.save(Path::new(path)))?,
    }
    Ok(path.to_string())
}

fn register_type(api: &mut Api) {
    api.ty::<ConceptVal>(
        "Concept",
        "a learned concept: a name, a class word, and what its method learned (Infusion's residual per cross-attention layer, a Textual Inversion embedding, a LoRA)",
    );
    const C: &str = "Concept";
    api.get(
        (C, "name", "string"),
        "what prompts call it: <name>",
        |c: &mut ConceptVal| c.name().to_string(),
    );
    api.get(
        (C, "word", "string"),
        "its class word, which F sees in its place",
        |c: &mut ConceptVal| c.word().to_string(),
    );
    api.get(
        (C, "method", "string"),
        "how it was learned: infusion, textual_inversion or lora",
        |c: &mut ConceptVal| c.method().to_string(),
    );
    api.get(
        (C, "size_bytes", "int"),
        "bytes of what it learned (f32)",
        |c: &mut ConceptVal| c.size_bytes() as INT,
    );
    let infusion = |c: &mut ConceptVal, what: &str| -> RhaiResult<Arc<Concept>> {
        c.infusion(what).cloned().map_err(err)
    };
    api.get_or_fail(
        (C, "n_values", "int"),
        "Infusion: the number of residual values over all layers",
        move |c: &mut ConceptVal| Ok(infusion(c, "n_values")?.n_values() as INT),
    );
    api.get_or_fail(
        (C, "base_model", "string"),
        "Infusion: the fingerprint of the UNet it was trained on (\"\" if unknown)",
        move |c: &mut ConceptVal| {
            Ok(infusion(c, "base_model")?
                .base_model
                .clone()
                .unwrap_or_default())
        },
    );
    api.get_or_fail(
        (C, "train", "map"),
        "Infusion: the training settings it was made with",
        move |c: &mut ConceptVal| Ok(json_to_dynamic(&infusion(c, "train")?.train)),
    );
    api.get_or_fail(
        (C, "train_steps", "int"),
        "Infusion: the training steps it was trained for",
        move |c: &mut ConceptVal| {
            Ok(infusion(c, "train_steps")?.train["steps"]
                .as_i64()
                .unwrap_or(0) as INT)
        },
    );
    let spec = api.declare(save_spec());
    let sp = spec.clone();
    api.func(&spec, move |c: &mut ConceptVal, path: &str| {
        save(&sp, c, path, &Map::new())
    });
    let sp = spec.clone();
    api.func(&spec, move |c: &mut ConceptVal, path: &str, o: Map| {
        save(&sp, c, path, &o)
    });
}

fn register_session(api: &mut Api, session: &Arc<Session>) {
    let spec = api.declare(train_spec());
    let (s, sp) = (session.clone(), spec.clone());
    api.func(
        &spec,
        move |m: &mut Model, folder: &str, name: &str, word: &str| {
            train(&s, &sp, m, (folder, name, word), &Map::new())
        },
    );
    let (s, sp) = (session.clone(), spec.clone());
    api.func(
        &spec,
        move |m: &mut Model, folder: &str, name: &str, word: &str, o: Map| {
            train(&s, &sp, m, (folder, name, word), &o)
        },
    );
    let spec = api.declare(load_spec());
    let (s, sp) = (session.clone(), spec.clone());
    api.func(&spec, move |path: &str| load(&s, &sp, path, &Map::new()));
    let (s, sp) = (session.clone(), spec.clone());
    api.func(&spec, move |path: &str, o: Map| load(&s, &sp, path, &o));
    let spec = api.declare(
        FnSpec::new("concepts")
            .sig("concepts() -> array of Concept")
            .doc("The concepts of this session.")
            .example("for c in concepts() { print(c); }"),
    );
    let s = session.clone();
    api.func(&spec, move || -> Array {
        let set = s.concepts.read().unwrap_or_else(|e| e.into_inner());
        set.iter()
            .map(|c| Dynamic::from(ConceptVal::Infusion(c.clone())))
            .chain(
                set.adapted()
                    .map(|a| Dynamic::from(ConceptVal::Adapted(a.clone()))),
            )
            .collect()
    });
    let spec = api.declare(
        FnSpec::new("forget_concept")
            .sig("forget_concept(name) -> bool")
            .doc("Removes a concept from the session; true if there was one.")
            .example("forget_concept(\"mycat\");"),
    );
    let s = session.clone();
    api.func(&spec, move |name: &str| -> bool {
        s.concepts
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .forget(name)
    });
    let spec = api.declare(
        FnSpec::new("default_templates")
            .sig("default_templates() -> array of string")
            .doc("The prompt templates train_concept uses when none are given ({} stands for the class word), after textual inversion's list. The stdlib's prompts::TEMPLATES.")
            .example("let t = default_templates(); print(t[0]);"),
    );
    api.func(&spec, || -> Array {
        DEFAULT_TEMPLATES
            .iter()
            .map(|t| Dynamic::from(t.to_string()))
            .collect()
    });
}

pub fn register(api: &mut Api, session: &Arc<Session>) {
    register_type(api);
    register_session(api, session);
}
