//! Concepts in scripts: train, load, save, list. Every concept trained or loaded joins the
//! session and is found by its `<name>` in prompts.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rhai::{Array, Dynamic, Map, INT};

use super::model::Model;
use super::{json_to_dynamic, Api};
use crate::actions::{self, TrainEnd};
use crate::app::script::docs::{FnSpec, Kind};
use crate::app::script::{err, rt, Opts, RhaiResult, Session, Thrown};
use crate::infusion::concept::Concept;
use crate::methods::{ConceptRef, SettingValue};
use crate::train::{Prior, TrainOptions, DEFAULT_TEMPLATES};

/// A concept value (cheap to clone): one handle, whatever its method.
#[derive(Debug, Clone)]
pub struct ConceptVal(pub ConceptRef);

impl ConceptVal {
    /// The Infusion concept, or an error that says what `what` needs.
    pub fn infusion(&self, what: &str) -> Result<&Concept, String> {
        self.0.as_any().downcast_ref::<Concept>().ok_or_else(|| {
            format!(
                "{what} takes Infusion concepts; <{}> is a {} concept",
                self.0.name(),
                self.0.method()
            )
        })
    }
}

impl std::fmt::Display for ConceptVal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.summary())
    }
}

/// Adds `concept` to the session (replacing one of its name, with a warning).
fn add(session: &Session, concept: ConceptRef) -> ConceptVal {
    session
        .concepts
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .add(concept.clone(), false, &session.job);
    ConceptVal(concept)
}

/// The options of every method's own settings (`rank`, `trigger`), once each, with the methods
/// that take them.
fn method_settings(spec: FnSpec) -> FnSpec {
    let mut spec = spec;
    let mut seen: Vec<&str> = vec![];
    for m in crate::methods::REGISTRY {
        for s in m.settings() {
            if seen.contains(&s.name) {
                continue;
            }
            seen.push(s.name);
            let takers: Vec<&str> = crate::methods::REGISTRY
                .iter()
                .filter(|m| m.settings().iter().any(|t| t.name == s.name))
                .map(|m| m.name())
                .collect();
            let doc = format!("{}: {}", takers.join(", "), s.doc);
            spec = match s.default {
                SettingValue::Count(d) => spec.opt_owned(s.name, Kind::POSITIVE, d as INT, doc),
                SettingValue::Word(d) => spec.opt_owned(s.name, Kind::Str, d, doc),
                SettingValue::Number(d) => spec.opt_owned(s.name, Kind::Float, d, doc),
            };
        }
    }
    spec
}

fn train_spec() -> FnSpec {
    let d = TrainOptions::default();
    let prior = Prior::default();
    let methods: Vec<String> = crate::methods::REGISTRY
        .iter()
        .map(|m| {
            format!(
                "{} ({}; {} steps, batch {}, lr {})",
                m.name(),
                m.about(),
                m.default_steps(),
                m.default_batch(),
                m.default_lr(m.default_batch(), false)
            )
        })
        .collect();
    let spec = FnSpec::method("Model", "train_concept")
        .sig("model.train_concept(folder, name, word) -> Concept")
        .sig("model.train_concept(folder, name, word, options) -> Concept")
        .doc("Trains a concept from a folder of 3-20 images: its name (prompts say <name>) and its class word, by one of the methods (Infusion, the paper's, by default), as the paper or diffusers' training scripts do. Ctrl-C stops and keeps what was learned; the concept joins the session either way.")
        .opt_owned("method", Kind::Choice(crate::methods::names_static()), "infusion", format!("the method: {}", methods.join("; ")))
        .opt_unset("train_steps", Kind::POSITIVE, "training steps (default: the method's)")
        .opt_unset("lr", Kind::Float, "AdamW's learning rate (default: the method's)");
    method_settings(spec)
        .opt("prior", Kind::Bool, false, "prior preservation (the methods that take it) with class images the model makes of \"a photo of a WORD\"")
        .opt("prior_images", Kind::POSITIVE, prior.images as INT, "how many class images prior preservation makes")
        .opt("prior_weight", Kind::Float, prior.weight, "the weight of the class images' loss")
        .opt_unset("masks", Kind::Str, "a folder of loss masks, one PNG per image named as it (white counts; default: the plain loss)")
        .opt_unset("prior_dir", Kind::Str, "a folder to keep the class images in and take them from next time (default: made each run)")
        .opt_unset("batch", Kind::POSITIVE, "images per step (default: the method's)")
        .opt_unset("micro_batch", Kind::POSITIVE, "images per forward and backward pass: the step's batch in slices of this many, the same update in less memory, a little slower (default: the whole batch, fewer where the memory available holds fewer; 1 fits SD1.5 Infusion training in 8 GB)")
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
    let given = |k: &str| o.given(k).then(|| o.get(k)).flatten();
    // The method's own options given (the others' are refused by the request).
    let mut settings = crate::methods::Settings::new();
    for m in crate::methods::REGISTRY {
        for s in m.settings() {
            if let Some(v) = given(s.name) {
                let v = match s.default {
                    SettingValue::Count(_) => serde_json::json!(v.as_int().unwrap_or(0)),
                    SettingValue::Word(_) => serde_json::json!(v.to_string()),
                    SettingValue::Number(_) => serde_json::json!(v
                        .as_float()
                        .ok()
                        .or_else(|| v.as_int().ok().map(|i| i as f64))
                        .unwrap_or(f64::NAN)),
                };
                settings.insert(s.name.to_string(), v);
            }
        }
    }
    let req = rt(actions::TrainAsk {
        folder: PathBuf::from(folder),
        name: name.to_string(),
        word: word.to_string(),
        method: o.given("method").then(|| o.string("method")).flatten(),
        settings,
        steps: o.usize("train_steps"),
        lr: o.float("lr"),
        batch: o.usize("batch"),
        micro_batch: o.usize("micro_batch"),
        seed: o.given("seed").then(|| o.u64("seed")).flatten(),
        templates: o
            .given("templates")
            .then(|| o.strings("templates"))
            .flatten(),
        flip: o.given("flip").then(|| o.bool("flip")).flatten(),
        checkpoint_every: o.usize("checkpoint_every"),
        checkpoint_dir: o.string("checkpoint_dir").map(PathBuf::from),
        masks: o.string("masks").map(PathBuf::from),
        prior: o.bool("prior").unwrap_or(false).then(|| Prior {
            images: o.usize("prior_images").unwrap_or(Prior::default().images),
            weight: o.float("prior_weight").unwrap_or(Prior::default().weight),
            dir: o.string("prior_dir").map(PathBuf::from),
        }),
        resume: o.string("resume").map(PathBuf::from),
        out: None,
        save_f32: false,
    }
    .resolve())?;
    session.job.reset();
    let t = rt(actions::train_concept(&model.sd, &req, &session.job))?;
    // What was learned (or the last good state) joins the session whatever happened.
    let concept = add(session, t.concept.clone());
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
                let saved = actions::save_stopped(&concept.0, t.steps_done);
                match saved {
                    Ok(path) => eprintln!("<{name}> is saved as {}", path.display()),
                    Err(e) => eprintln!("error: {e}"),
                }
                return Err(crate::app::script::cancelled());
            }
            session.job.reset();
            Ok(concept)
        }
        TrainEnd::Failed(e) => Err(Thrown::of(&e)
            .message(format!("{e} (<{name}> keeps them)"))
            .into()),
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
        .opt_unset("beta", Kind::Float, "Perfusion: the gate's threshold at generation (default: the file's, 0.7 when trained here)")
        .opt_unset("tau", Kind::Float, "Perfusion: the gate's temperature at generation (default: the file's, 0.15)")
        .example("load_concept(\"mycat.safetensors\"); load_concept(\"pot_lora.safetensors\", #{word: \"teapot\", trigger: \"sks\", scale: 0.8});")
}

fn load(session: &Session, spec: &FnSpec, path: &str, opts: &Map) -> RhaiResult<ConceptVal> {
    let o = Opts::of(opts, spec)?;
    let req = crate::methods::ConceptRequest {
        path: PathBuf::from(path),
        name: o.string("name"),
        word: o.string("word"),
        scale: o.float("scale"),
        trigger: o.string("trigger"),
        force: o.bool("force").unwrap_or(false),
        beta: o.float("beta"),
        tau: o.float("tau"),
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
    Ok(ConceptVal(loaded))
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
    let f32 = o.string("dtype").as_deref() == Some("f32");
    rt(c.0.save(Path::new(path), f32))?;
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
        |c: &mut ConceptVal| c.0.name().to_string(),
    );
    api.get(
        (C, "word", "string"),
        "its class word, which F sees in its place",
        |c: &mut ConceptVal| c.0.word().to_string(),
    );
    api.get(
        (C, "method", "string"),
        "how it was learned: its method's name",
        |c: &mut ConceptVal| c.0.method().to_string(),
    );
    api.get(
        (C, "size_bytes", "int"),
        "bytes of what it learned (f32)",
        |c: &mut ConceptVal| c.0.size_bytes() as INT,
    );
    api.get(
        (C, "base_model", "string"),
        "the fingerprint of the UNet it was trained on (\"\" if unknown)",
        |c: &mut ConceptVal| c.0.provenance().base_model.unwrap_or_default(),
    );
    api.get(
        (C, "train_steps", "int"),
        "the training steps it was trained for (0 if unknown)",
        |c: &mut ConceptVal| c.0.provenance().train_steps.unwrap_or(0) as INT,
    );
    api.get_or_fail(
        (C, "n_values", "int"),
        "Infusion: the number of residual values over all layers",
        |c: &mut ConceptVal| Ok(c.infusion("n_values").map_err(err)?.n_values() as INT),
    );
    api.get_or_fail(
        (C, "train", "map"),
        "Infusion: the training settings it was made with",
        |c: &mut ConceptVal| Ok(json_to_dynamic(&c.infusion("train").map_err(err)?.train)),
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
