//! Concepts in scripts: train, load, save, list. Every concept trained or loaded joins the
//! session and is found by its `<name>` in prompts.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::DType;
use rhai::{Array, Dynamic, Map, FLOAT, INT};

use super::model::Model;
use super::{json_to_dynamic, Api};
use crate::actions::{self, TrainEnd, TrainRequest};
use crate::app::script::docs::{FnSpec, Kind};
use crate::app::script::{err, rt, Opts, RhaiResult, Session};
use crate::infusion::concept::Concept;
use crate::infusion::train::{TrainOptions, DEFAULT_TEMPLATES};

/// A concept value (cheap to clone).
#[derive(Debug, Clone)]
pub struct ConceptVal(pub Arc<Concept>);

impl std::fmt::Display for ConceptVal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Concept(<{}> = {}, {} layers, {} values)",
            self.0.name,
            self.0.word,
            self.0.deltas.len(),
            self.0.n_values()
        )
    }
}

fn add(session: &Session, concept: Concept) -> ConceptVal {
    let concept = Arc::new(concept);
    session
        .concepts
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .add(concept.clone(), false, &session.job);
    ConceptVal(concept)
}

fn train_spec() -> FnSpec {
    let d = TrainOptions::default();
    FnSpec::method("Model", "train_concept")
        .sig("model.train_concept(folder, name, word) -> Concept")
        .sig("model.train_concept(folder, name, word, options) -> Concept")
        .doc("Trains a concept from a folder of 3-20 images: its name (prompts say <name>) and its class word. AdamW on the residuals only, the paper's settings by default. Ctrl-C stops and keeps the residuals reached; the concept joins the session either way.")
        .opt("train_steps", Kind::POSITIVE, d.steps as INT, "training steps")
        .opt("lr", Kind::Float, d.lr as FLOAT, "AdamW's learning rate")
        .opt("batch", Kind::POSITIVE, d.batch as INT, "images per step")
        .opt("seed", Kind::SEED, d.seed as INT, "seed of every random draw (images, timesteps, noise)")
        .opt("templates", Kind::Strings, d.templates.clone(), "prompt templates, {} for the class word")
        .opt("flip", Kind::Bool, d.flip, "also train on the mirror images")
        .opt_unset("checkpoint_every", Kind::POSITIVE, "write a resumable checkpoint every N steps")
        .opt_unset("checkpoint_dir", Kind::Str, "where checkpoints go (default: NAME-checkpoints/ in the working folder)")
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
    let req = TrainRequest {
        folder: PathBuf::from(folder),
        name: name.to_string(),
        word: word.to_string(),
        options: TrainOptions {
            steps: o.usize("train_steps").unwrap_or(d.steps),
            lr: o.float("lr").unwrap_or(d.lr),
            batch: o.usize("batch").unwrap_or(d.batch),
            seed: o.u64("seed").unwrap_or(d.seed),
            templates: o.strings("templates").unwrap_or(d.templates),
            flip: o.bool("flip").unwrap_or(d.flip),
            checkpoint_every: o.usize("checkpoint_every"),
            checkpoint_dir: o.string("checkpoint_dir").map(PathBuf::from),
            weight_decay: d.weight_decay,
        },
        resume: None,
        out: None,
        save_f32: false,
    };
    session.job.reset();
    let t = rt(actions::train_concept(&model.sd, &req, &session.job))?;
    // The deltas reached (or the last good ones) join the session whatever happened.
    let concept = add(session, t.concept);
    match t.end {
        TrainEnd::Finished => {
            if let Some(l) = t.losses.last() {
                eprintln!("<{name}>: {} steps, loss {l:.5}", t.steps_done);
            }
            Ok(concept)
        }
        TrainEnd::Cancelled => {
            eprintln!(
                "stopped at step {}: <{name}> keeps the deltas reached",
                t.steps_done
            );
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
        .doc("Loads a concept file (infusion-concept/1) into the session, checked against the loaded model. A concept trained on another model is refused unless forced.")
        .opt("force", Kind::Bool, false, "use it even if it was trained on another model")
        .example("load_concept(\"mycat.safetensors\"); load_concept(\"teapot.safetensors\");")
}

fn load(session: &Session, spec: &FnSpec, path: &str, opts: &Map) -> RhaiResult<ConceptVal> {
    let o = Opts::of(opts, spec)?;
    let force = o.bool("force").unwrap_or(false);
    let model = session
        .model
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let concept = rt(session
        .concepts
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .load_file(
            Path::new(path),
            model.as_ref().map(|m| &*m.sd),
            force,
            &session.job,
        ))?;
    Ok(ConceptVal(concept))
}

fn save_spec() -> FnSpec {
    FnSpec::method("Concept", "save")
        .sig("concept.save(path) -> path")
        .sig("concept.save(path, options) -> path")
        .doc("Writes the concept as a safetensors file (infusion-concept/1), atomically.")
        .opt("dtype", Kind::Choice(&["f16", "f32"]), "f16", "the residuals' precision")
        .example("cat.save(\"mycat.safetensors\"); cat.save(\"mycat-f32.safetensors\", #{dtype: \"f32\"});")
}

fn save(spec: &FnSpec, c: &ConceptVal, path: &str, opts: &Map) -> RhaiResult<String> {
    let o = Opts::of(opts, spec)?;
    let dtype = match o.string("dtype").as_deref() {
        Some("f32") => DType::F32,
        _ => DType::F16,
    };
    rt(c.0.save(Path::new(path), dtype))?;
    Ok(path.to_string())
}

fn register_type(api: &mut Api) {
    api.ty::<ConceptVal>(
        "Concept",
        "a learned concept: a name, a class word, one residual per cross-attention layer",
    );
    const C: &str = "Concept";
    api.get(
        (C, "name", "string"),
        "what prompts call it: <name>",
        |c: &mut ConceptVal| c.0.name.clone(),
    );
    api.get(
        (C, "word", "string"),
        "its class word, which F sees in its place",
        |c: &mut ConceptVal| c.0.word.clone(),
    );
    api.get(
        (C, "n_values", "int"),
        "the number of residual values over all layers",
        |c: &mut ConceptVal| c.0.n_values() as INT,
    );
    api.get(
        (C, "base_model", "string"),
        "the fingerprint of the UNet it was trained on (\"\" if unknown)",
        |c: &mut ConceptVal| c.0.base_model.clone().unwrap_or_default(),
    );
    api.get(
        (C, "train", "map"),
        "the training settings it was made with",
        |c: &mut ConceptVal| json_to_dynamic(&c.0.train),
    );
    api.get(
        (C, "train_steps", "int"),
        "the training steps it was trained for",
        |c: &mut ConceptVal| c.0.train["steps"].as_i64().unwrap_or(0) as INT,
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
        s.concepts
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|c| Dynamic::from(ConceptVal(c.clone())))
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
            .remove(name)
            .is_some()
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
