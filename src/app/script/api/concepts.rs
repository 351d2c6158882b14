//! Concepts in scripts: train, load, save, list. Every concept trained or loaded joins the
//! session and is found by its `<name>` in prompts.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::DType;
use rhai::{Array, Dynamic, Engine, Map, INT};

use super::model::Model;
use super::{json_to_dynamic, volatile};
use crate::actions::{self, TrainEnd, TrainRequest};
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
        .insert((*concept).clone(), false);
    ConceptVal(concept)
}

fn train(
    session: &Session,
    model: &Model,
    folder: &str,
    name: &str,
    word: &str,
    opts: &Map,
) -> RhaiResult<ConceptVal> {
    let o = Opts::new(
        opts,
        "train_concept",
        &[
            "steps",
            "lr",
            "batch",
            "seed",
            "templates",
            "checkpoint_every",
            "checkpoint_dir",
            "flip",
        ],
    )?;
    let d = TrainOptions::default();
    let req = TrainRequest {
        folder: PathBuf::from(folder),
        name: name.to_string(),
        word: word.to_string(),
        options: TrainOptions {
            steps: o.usize("steps")?.unwrap_or(d.steps),
            lr: o.float("lr")?.unwrap_or(d.lr),
            batch: o.usize("batch")?.unwrap_or(d.batch),
            seed: o.int("seed")?.map(|s| s as u64).unwrap_or(d.seed),
            templates: o.strings("templates")?.unwrap_or(d.templates),
            flip: o.bool("flip")?.unwrap_or(d.flip),
            checkpoint_every: o.usize("checkpoint_every")?,
            checkpoint_dir: o.string("checkpoint_dir")?.map(PathBuf::from),
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
        TrainEnd::Finished => Ok(concept),
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

fn load(session: &Session, path: &str, opts: &Map) -> RhaiResult<ConceptVal> {
    let o = Opts::new(opts, "load_concept", &["force"])?;
    let force = o.bool("force")?.unwrap_or(false);
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

pub fn register(engine: &mut Engine, session: &Arc<Session>) {
    engine.register_type_with_name::<ConceptVal>("Concept");
    engine.register_fn("to_string", |c: &mut ConceptVal| c.to_string());
    engine.register_fn("to_debug", |c: &mut ConceptVal| c.to_string());
    engine.register_get("name", |c: &mut ConceptVal| c.0.name.clone());
    engine.register_get("word", |c: &mut ConceptVal| c.0.word.clone());
    engine.register_get("n_values", |c: &mut ConceptVal| c.0.n_values() as INT);
    engine.register_get("base_model", |c: &mut ConceptVal| {
        c.0.base_model.clone().unwrap_or_default()
    });
    engine.register_get("train", |c: &mut ConceptVal| json_to_dynamic(&c.0.train));
    engine.register_get("steps", |c: &mut ConceptVal| {
        c.0.train["steps"].as_i64().unwrap_or(0) as INT
    });
    volatile!(engine, "save", |c: &mut ConceptVal,
                               path: &str|
     -> RhaiResult<String> {
        rt(c.0.save(Path::new(path), DType::F16))?;
        Ok(path.to_string())
    });
    volatile!(engine, "save", |c: &mut ConceptVal,
                               path: &str,
                               o: Map|
     -> RhaiResult<String> {
        let o = Opts::new(&o, "save", &["dtype"])?;
        let dtype = match o.string("dtype")?.as_deref() {
            None | Some("f16") => DType::F16,
            Some("f32") => DType::F32,
            Some(d) => return Err(err(format!("save: dtype {d:?}: concepts are f16 or f32"))),
        };
        rt(c.0.save(Path::new(path), dtype))?;
        Ok(path.to_string())
    });

    let s = session.clone();
    volatile!(
        engine,
        "train_concept",
        move |m: &mut Model, folder: &str, name: &str, word: &str| {
            train(&s, m, folder, name, word, &Map::new())
        }
    );
    let s = session.clone();
    volatile!(
        engine,
        "train_concept",
        move |m: &mut Model, folder: &str, name: &str, word: &str, o: Map| {
            train(&s, m, folder, name, word, &o)
        }
    );
    engine.register_fn("default_templates", || -> Array {
        DEFAULT_TEMPLATES
            .iter()
            .map(|t| Dynamic::from(t.to_string()))
            .collect()
    });
    let s = session.clone();
    volatile!(engine, "load_concept", move |path: &str| load(
        &s,
        path,
        &Map::new()
    ));
    let s = session.clone();
    volatile!(engine, "load_concept", move |path: &str, o: Map| load(
        &s, path, &o
    ));
    let s = session.clone();
    volatile!(engine, "concepts", move || -> Array {
        s.concepts
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|c| Dynamic::from(ConceptVal(c.clone())))
            .collect()
    });
    let s = session.clone();
    volatile!(engine, "forget_concept", move |name: &str| -> bool {
        s.concepts
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name)
            .is_some()
    });
}
