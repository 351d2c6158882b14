//! `compare_methods`: the paper's comparison from scripts, over [`crate::actions::compare`].

use std::path::PathBuf;
use std::sync::Arc;

use rhai::{Array, Dynamic, Map, FLOAT, INT};

use super::images::Img;
use super::model::Model;
use super::Api;
use crate::actions::{compare, CompareAsk};
use crate::app::script::docs::{FnSpec, Kind};
use crate::app::script::{err, rt, Opts, RhaiResult, Session};
use crate::compare::CompareOptions;

fn spec() -> FnSpec {
    let d = CompareOptions::default();
    let checkpoints: Vec<INT> = d.checkpoints.iter().map(|&c| c as INT).collect();
    FnSpec::method("Model", "compare_methods")
        .sig("compare_methods(model, data, options) -> #{csv, table, charts, missing, cells_done, cells_skipped}")
        .doc("The paper's comparison: every method trains on the data (a concept's folder with `name` and `word`, or a dataset folder in the DreamBooth dataset's layout) and each checkpoint is measured (the latent Fisher divergence on captions without the concept, W2 of F's and C's latents, CLIP-T / CLIP-I / DINO-I on DreamBooth's prompts, the file's size). Cells are written to `out` as they are measured: a run resumes where one stopped, `shard` runs a part (Slurm / Kubernetes / RANK environments are read otherwise), `merge` builds curves.csv, the charts (figures 10 and 11) and table.md from the cells there.")
        .opt_unset("name", Kind::Str, "the concept's name (one concept's folder)")
        .opt_unset("word", Kind::Str, "its class word (one concept's folder)")
        .opt("methods", Kind::Strings, d.methods.clone(), "the methods, as --method names them")
        .opt_unset("settings", Kind::Other("map of method -> options map"), "each method's own options, e.g. #{lora: #{rank: 8}}")
        .opt("checkpoints", Kind::Other("array of training steps"), checkpoints, "training steps to measure at")
        .opt("samples", Kind::Int { min: 2, max: INT::MAX }, d.samples as INT, "W2: images per side for each prompt")
        .opt("w2_prompts", Kind::POSITIVE, d.w2_prompts as INT, "W2: prompts (the subject's DreamBooth prompts, the first N)")
        .opt_unset("fisher_samples", Kind::POSITIVE, "Fisher divergence samples (default: samples)")
        .opt_unset("fisher_prompts", Kind::POSITIVE, "Fisher divergence: the first N captions (default: fisher_samples, one sample a caption)")
        .opt_unset("captions", Kind::Str, "the Fisher captions, one a line (default: the shipped list)")
        .opt("prompt_chunk", Kind::POSITIVE, d.prompt_chunk as INT, "prompts per W2 or CLIP / DINO cell (a killed run loses at most one chunk)")
        .opt("prompts", Kind::POSITIVE, d.prompts as INT, "CLIP / DINO: prompts (DreamBooth's, the first N)")
        .opt("images_per_prompt", Kind::POSITIVE, d.images_per_prompt as INT, "CLIP / DINO: images per prompt")
        .opt("steps", Kind::POSITIVE, d.steps as INT, "denoising steps of every generation")
        .opt("guidance", Kind::Float, d.guidance as FLOAT, "guidance scale")
        .opt("seed", Kind::SEED, d.seed as INT, "the seed of training and of every generation")
        .opt_unset("clip", Kind::Str, "the CLIP folder (default: the bundled random one)")
        .opt_unset("dino", Kind::Str, "the DINO folder (default: the bundled random one)")
        .opt("out", Kind::Str, "compare", "the shared output folder")
        .opt_unset("shard", Kind::Str, "run only shard K/N (default: the scheduler's environment, else all)")
        .opt_unset("shard_count", Kind::POSITIVE, "the shard count of a Kubernetes Indexed Job")
        .opt("merge", Kind::Bool, false, "only build the results from the cells there")
        .example("let r = compare_methods(m, \"photos/pot\", #{name: \"pot\", word: \"teapot\", methods: [\"infusion\", \"lora\"], checkpoints: [100, 200]}); for c in r.charts { show(c); }")
}

fn run(session: &Session, spec: &FnSpec, model: &Model, data: &str, opts: &Map) -> RhaiResult<Map> {
    let o = Opts::of(opts, spec)?;
    let d = CompareOptions::default();
    let checkpoints = match o.get("checkpoints") {
        None => d.checkpoints.clone(),
        Some(v) => v
            .into_array()
            .map_err(|_| err("compare_methods: `checkpoints` is an array of step counts"))?
            .into_iter()
            .map(|x| {
                x.as_int()
                    .ok()
                    .filter(|&i| i >= 1)
                    .map(|i| i as usize)
                    .ok_or_else(|| err("compare_methods: `checkpoints` are step counts (>= 1)"))
            })
            .collect::<RhaiResult<Vec<_>>>()?,
    };
    let mut settings = std::collections::BTreeMap::new();
    if let Some(v) = o.get("settings") {
        let by_method = v
            .try_cast::<Map>()
            .ok_or_else(|| err("compare_methods: `settings` is a map of method -> options map"))?;
        for (method, given) in by_method {
            let given = given.try_cast::<Map>().ok_or_else(|| {
                err(format!(
                    "compare_methods: settings.{method} is an options map"
                ))
            })?;
            let mut s = crate::methods::Settings::new();
            for (k, v) in given {
                let json = if let Ok(i) = v.as_int() {
                    serde_json::json!(i)
                } else if let Ok(f) = v.as_float() {
                    serde_json::json!(f)
                } else if let Ok(b) = v.as_bool() {
                    serde_json::json!(b)
                } else if v.is_string() {
                    serde_json::json!(v.to_string())
                } else {
                    return Err(err(format!(
                        "compare_methods: settings.{method}.{k} is not a number, word or bool"
                    )));
                };
                s.insert(k.to_string(), json);
            }
            settings.insert(method.to_string(), s);
        }
    }
    let samples = o.usize("samples").unwrap_or(d.samples);
    let ask = CompareAsk {
        data: PathBuf::from(data),
        name: o.string("name"),
        word: o.string("word"),
        options: CompareOptions {
            methods: o.strings("methods").unwrap_or(d.methods),
            settings,
            checkpoints,
            samples,
            w2_prompts: o.usize("w2_prompts").unwrap_or(d.w2_prompts),
            fisher_samples: o.usize("fisher_samples").unwrap_or(samples),
            fisher_prompts: o
                .usize("fisher_prompts")
                .unwrap_or(o.usize("fisher_samples").unwrap_or(samples)),
            captions: o.string("captions").map(PathBuf::from),
            prompts: o.usize("prompts").unwrap_or(d.prompts),
            prompt_chunk: o.usize("prompt_chunk").unwrap_or(d.prompt_chunk),
            images_per_prompt: o.usize("images_per_prompt").unwrap_or(d.images_per_prompt),
            steps: o.usize("steps").unwrap_or(d.steps),
            guidance: o.float("guidance").unwrap_or(d.guidance),
            seed: o.u64("seed").unwrap_or(d.seed),
        },
        clip: o.string("clip").map(PathBuf::from),
        dino: o.string("dino").map(PathBuf::from),
        out: PathBuf::from(o.string("out").unwrap_or_else(|| "compare".into())),
        shard: o.string("shard"),
        shard_count: o.usize("shard_count"),
        merge: o.bool("merge").unwrap_or(false),
    };
    session.job.reset();
    let done = rt(compare(&model.sd, &ask, &session.job))?;
    let mut m = Map::new();
    m.insert(
        "cells_done".into(),
        Dynamic::from(done.run.cells_done as INT),
    );
    m.insert(
        "cells_skipped".into(),
        Dynamic::from(done.run.cells_skipped as INT),
    );
    if let Some(r) = done.merged {
        m.insert("csv".into(), Dynamic::from(r.csv.display().to_string()));
        m.insert("table".into(), Dynamic::from(r.table.display().to_string()));
        let charts: Array = r
            .charts
            .into_iter()
            .map(|(_, img)| Dynamic::from(Img::new(img)))
            .collect();
        m.insert("charts".into(), Dynamic::from(charts));
        let missing: Array = r
            .missing
            .iter()
            .map(|p| Dynamic::from(p.display().to_string()))
            .collect();
        m.insert("missing".into(), Dynamic::from(missing));
    }
    Ok(m)
}

pub fn register(api: &mut Api, session: &Arc<Session>) {
    let prompts = api.declare(
        FnSpec::new("dreambooth_prompts")
            .sig("dreambooth_prompts(kind) -> array of string")
            .doc("DreamBooth's evaluation prompts ({} stands for the concept), as the comparison uses them: kind \"object\" or \"live\" (its cats and dogs). The stdlib's prompts::OBJECT_PROMPTS and prompts::LIVE_PROMPTS.")
            .example("for p in dreambooth_prompts(\"object\") { print(p); }"),
    );
    api.func(&prompts, |kind: &str| -> RhaiResult<Array> {
        let list: &[&str] = match kind {
            "object" => &crate::compare::data::OBJECT_PROMPTS,
            "live" => &crate::compare::data::LIVE_PROMPTS,
            other => {
                return Err(err(format!(
                    "dreambooth_prompts: `{other}` is neither \"object\" nor \"live\""
                )))
            }
        };
        Ok(list.iter().map(|p| Dynamic::from(p.to_string())).collect())
    });
    let spec = api.declare(spec());
    let (s, sp) = (session.clone(), spec.clone());
    api.func(&spec, move |m: &mut Model, data: &str, o: Map| {
        run(&s, &sp, m, data, &o)
    });
}
