//! Models in scripts: loading (with the kernels a model runs), generating, tokens and device
//! information.

use std::path::Path;
use std::sync::Arc;

use rhai::{Array, Dynamic, Map, FLOAT, INT};

use super::generation::{Gen, MapsMode};
use super::Api;
use crate::actions::{self, ModelRequest};
use crate::app::script::docs::{FnSpec, Kind};
use crate::app::script::{err, rt, Opts, RhaiResult, Session};
use crate::customize::generate::{generate_pair, PairOptions};
use crate::infusion::maps::AttentionMaps;
use crate::sd::fused::Kernels;
use crate::sd::pipeline::{load_noise, GenerateOptions, StableDiffusion};
use crate::sd::sampler::{SamplerKind, SamplerOptions};

/// A loaded model (cheap to clone).
#[derive(Clone)]
pub struct Model {
    pub sd: Arc<StableDiffusion>,
    /// What it was loaded from.
    pub source: String,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Model({})", self.source)
    }
}

impl std::fmt::Display for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Model({} on {:?}, {:?}, {}px, {} kernels)",
            self.source,
            self.sd.device(),
            self.sd.dtype(),
            self.sd.default_size(),
            self.sd.kernels()
        )
    }
}

fn load_spec(session: &Session) -> FnSpec {
    FnSpec::new("load_model")
        .sig("load_model() -> Model")
        .sig("load_model(options) -> Model")
        .sig("load_model(path_or_repo_id) -> Model")
        .sig("load_model(path_or_repo_id, options) -> Model")
        .doc("Loads a Stable Diffusion 1.x model from a diffusers folder, a repo id in the Hugging Face cache (nothing is downloaded) or a single .safetensors checkpoint of the original layout. Without a path: the --model given on the command line, else the bundled tiny model. Concepts loaded afterwards are checked against this model.")
        .opt("device", Kind::Str, session.config.model.device.clone(), "\"cpu\", \"cuda\" or \"cuda:N\" (default: --device)")
        .opt("dtype", Kind::Str, session.config.model.dtype.clone(), "the working precision: \"f32\", \"f16\" or \"bf16\" (fp16, bfloat16 too; default: --dtype)")
        .opt_unset("config", Kind::Str, "a diffusers folder whose configs describe a single-file checkpoint (default: --config, else SD1.5's)")
        .opt_unset("vae", Kind::Str, "another VAE: a diffusers folder or a .safetensors file (default: --vae)")
        .opt_unset("ema", Kind::Bool, "single files: true takes the EMA copy of the UNet, false the plain weights (default: --ema/--no-ema, else the EMA copy when the file has one)")
        .opt("kernels", Kind::Choice(&Kernels::NAMES), session.config.model.kernels.name(), "what the model's layers run, for as long as it lives: \"naive\" (candle's composite ops) or \"fused\" (attention without a score matrix in memory, group norm + SiLU in one pass: CUDA kernels in f16/bf16, plain loops on the CPU; layers whose maps are captured and layers that training differentiates through stay naive). Other models keep their own (default: --kernels)")
        .example("let m = load_model(\"stable-diffusion-v1-5/stable-diffusion-v1-5\", #{device: \"cuda\", dtype: \"f16\", kernels: \"fused\"});")
}

fn load(session: &Session, spec: &FnSpec, path: Option<&str>, opts: &Map) -> RhaiResult<Model> {
    let o = Opts::of(opts, spec)?;
    let d = &session.config.model;
    let req = ModelRequest {
        model: path.map(str::to_string).or_else(|| d.model.clone()),
        device: o.string("device").unwrap_or_else(|| d.device.clone()),
        dtype: o.string("dtype").unwrap_or_else(|| d.dtype.clone()),
        config: o.string("config").or_else(|| d.config.clone()),
        vae: o.string("vae").or_else(|| d.vae.clone()),
        ema: o.bool("ema").or(d.ema),
        kernels: match o.string("kernels") {
            Some(k) => k.parse().map_err(err)?,
            None => d.kernels,
        },
    };
    let loaded = rt(actions::load_model(&req, &session.job))?;
    let model = Model {
        sd: Arc::new(loaded.sd),
        source: loaded.source,
    };
    *session.model.lock().unwrap_or_else(|e| e.into_inner()) = Some(model.clone());
    Ok(model)
}

fn generate_spec() -> FnSpec {
    let d = GenerateOptions::default();
    let i = PairOptions::default();
    FnSpec::method("Model", "generate")
        .sig("model.generate(prompt) -> Generation")
        .sig("model.generate(prompt, options) -> Generation")
        .doc("Generates the base image (plain SD, F) and the customized image (Infusion, C) from the same noise. <name> in the prompt marks a loaded concept; without concepts both are the plain image. Ctrl-C cancels.")
        .opt("seed", Kind::SEED, d.seed as INT, "seed of the initial noise")
        .opt("steps", Kind::POSITIVE, d.steps as INT, "denoising steps")
        .opt_owned("scheduler", Kind::Choice(&SamplerKind::NAMES), d.sampler.kind.name(), format!("the sampler, as diffusers' scheduler of that name. {}", SamplerKind::help()))
        .opt_owned("karras", Kind::Bool, d.sampler.karras, format!("Karras sigmas ({})", SamplerKind::karras_names()))
        .opt("guidance", Kind::Float, d.guidance as FLOAT, "classifier-free guidance scale")
        .opt("negative", Kind::Str, d.negative_prompt.clone(), "negative prompt")
        .opt_unset("width", Kind::POSITIVE, "image width in pixels (default: the model's size)")
        .opt_unset("height", Kind::POSITIVE, "image height in pixels (default: the model's size)")
        .opt_unset("noise", Kind::Str, "a safetensors file whose tensor `noise` is the initial latent")
        .opt("replace_steps", Kind::Float, i.replace_steps as FLOAT, "fraction of the steps in which C uses F's attention maps")
        .opt("maps", Kind::Other("\"light\", \"all\", \"off\" or true/false"), "light", "attention maps to keep: 16x16 maps averaged (light), every layer and step (all), none")
        .example("let g = m.generate(\"a <mycat> reading a book\", #{seed: 7, steps: 30}); show(hstack([g.base, g.custom]));")
}

fn generate(
    session: &Session,
    spec: &FnSpec,
    model: &Model,
    prompt: &str,
    opts: &Map,
) -> RhaiResult<Gen> {
    let o = Opts::of(opts, spec)?;
    let d = GenerateOptions::default();
    let generate = GenerateOptions {
        negative_prompt: o.string("negative").unwrap_or_default(),
        seed: o.u64("seed").unwrap_or(d.seed),
        steps: o.usize("steps").unwrap_or(d.steps),
        guidance: o.float("guidance").unwrap_or(d.guidance),
        sampler: rt(SamplerOptions::parse(
            &o.string("scheduler")
                .unwrap_or_else(|| d.sampler.kind.name().into()),
            o.bool("karras").unwrap_or(d.sampler.karras),
        ))?,
        width: o.usize("width"),
        height: o.usize("height"),
        noise: o
            .string("noise")
            .map(|p| rt(load_noise(Path::new(&p))))
            .transpose()?,
        step_noise: None,
    };
    let maps = match MapsMode::of(o.get("maps"))? {
        MapsMode::Off => None,
        MapsMode::Light => Some(Arc::new(AttentionMaps::light(256))),
        MapsMode::All => Some(Arc::new(AttentionMaps::new(true))),
    };
    let opts = PairOptions {
        generate,
        replace_steps: o.float("replace_steps").unwrap_or(1.0),
    };
    let concepts = session
        .concepts
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    session.job.reset();
    let g = rt(generate_pair(
        &model.sd,
        &concepts,
        prompt,
        &opts,
        maps.as_deref(),
        &session.job,
    ))?;
    Ok(Gen {
        g: Arc::new(g),
        maps,
    })
}

/// How a prompt tokenizes, concept marks replaced by their words.
fn tokens(
    session: &Session,
    model: &Model,
    prompt: &str,
) -> RhaiResult<crate::sd::tokenizer::Tokens> {
    let concepts = session.concepts.read().unwrap_or_else(|e| e.into_inner());
    let base = concepts
        .parse(prompt)
        .map(|p| p.base)
        .unwrap_or_else(|_| prompt.to_string());
    rt(model.sd.tokenize(&base))
}

fn device_info(session: &Session) -> Map {
    let mut m = Map::new();
    m.insert(
        "default_device".into(),
        Dynamic::from(session.config.model.device.clone()),
    );
    m.insert(
        "default_dtype".into(),
        Dynamic::from(session.config.model.dtype.clone()),
    );
    m.insert(
        "default_kernels".into(),
        Dynamic::from(session.config.model.kernels.to_string()),
    );
    m.insert(
        "cuda_compiled".into(),
        Dynamic::from(cfg!(feature = "cuda")),
    );
    m.insert(
        "cuda_available".into(),
        Dynamic::from(candle_core::utils::cuda_is_available()),
    );
    m.insert(
        "cpu_threads".into(),
        Dynamic::from(candle_core::utils::get_num_threads() as INT),
    );
    if let Some(model) = session
        .model
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
    {
        m.insert("model".into(), Dynamic::from(model.to_string()));
    }
    m
}

/// Resident memory of this process (Linux).
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

fn register_loading(api: &mut Api, session: &Arc<Session>) {
    api.ty::<Model>("Model", "a loaded Stable Diffusion 1.x model (load_model)");
    api.get(
        ("Model", "size", "int"),
        "the native image size in pixels",
        |m: &mut Model| m.sd.default_size() as INT,
    );
    api.get(
        ("Model", "source", "string"),
        "the folder or repo id it was loaded from",
        |m: &mut Model| m.source.clone(),
    );
    api.get(
        ("Model", "kernels", "string"),
        "what its layers run, as loaded: \"naive\" or \"fused\" (load_model's kernels)",
        |m: &mut Model| m.sd.kernels().to_string(),
    );
    api.get(
        ("Model", "fingerprint", "string"),
        "the fingerprint of its UNet weights (concepts' base_model)",
        |m: &mut Model| m.sd.unet_fingerprint().to_string(),
    );
    let spec = api.declare(load_spec(session));
    let (s, sp) = (session.clone(), spec.clone());
    api.func(&spec, move || load(&s, &sp, None, &Map::new()));
    let (s, sp) = (session.clone(), spec.clone());
    api.func(&spec, move |o: Map| load(&s, &sp, None, &o));
    let (s, sp) = (session.clone(), spec.clone());
    api.func(&spec, move |path: &str| {
        load(&s, &sp, Some(path), &Map::new())
    });
    let (s, sp) = (session.clone(), spec.clone());
    api.func(&spec, move |path: &str, o: Map| {
        load(&s, &sp, Some(path), &o)
    });

    let spec = api.declare(generate_spec());
    let (s, sp) = (session.clone(), spec.clone());
    api.func(&spec, move |m: &mut Model, prompt: &str| {
        generate(&s, &sp, m, prompt, &Map::new())
    });
    let (s, sp) = (session.clone(), spec.clone());
    api.func(&spec, move |m: &mut Model, prompt: &str, o: Map| {
        generate(&s, &sp, m, prompt, &o)
    });
}

fn register_tokens(api: &mut Api, session: &Arc<Session>) {
    let spec = api.declare(
        FnSpec::method("Model", "tokens")
            .sig("model.tokens(prompt) -> array of #{id, text, position}")
            .doc("How a prompt tokenizes (concept marks replaced by their words), start and end tokens included.")
            .example("for t in m.tokens(\"a <mycat> on a mat\") { print(t); }"),
    );
    let s = session.clone();
    api.func(
        &spec,
        move |m: &mut Model, prompt: &str| -> RhaiResult<Array> {
            let t = tokens(&s, m, prompt)?;
            Ok((0..t.n_tokens)
                .map(|i| {
                    let mut e = Map::new();
                    e.insert("id".into(), Dynamic::from(t.ids[i] as INT));
                    e.insert("text".into(), Dynamic::from(t.tokens[i].clone()));
                    e.insert("position".into(), Dynamic::from(i as INT));
                    Dynamic::from(e)
                })
                .collect())
        },
    );
    let spec = api.declare(
        FnSpec::method("Model", "token_ids")
            .sig("model.token_ids(prompt) -> array of int")
            .doc("The padded token ids the text encoder gets.")
            .example("print(m.token_ids(\"a photo of a cat\").len());"),
    );
    let s = session.clone();
    api.func(
        &spec,
        move |m: &mut Model, prompt: &str| -> RhaiResult<Array> {
            let t = tokens(&s, m, prompt)?;
            Ok(t.ids.iter().map(|&i| Dynamic::from(i as INT)).collect())
        },
    );
}

fn register_machine(api: &mut Api, session: &Arc<Session>) {
    let spec = api.declare(
        FnSpec::new("device_info")
            .sig("device_info() -> map")
            .doc("The default device, dtype and kernels (load_model's), whether CUDA is compiled in and available, CPU threads, the loaded model.")
            .example("print(device_info());"),
    );
    let s = session.clone();
    api.func(&spec, move || device_info(&s));
    let spec = api.declare(
        FnSpec::new("memory_info")
            .sig("memory_info() -> map")
            .doc("Memory in use: the process's resident bytes.")
            .example("print(memory_info());"),
    );
    api.func(&spec, || -> Map {
        let mut m = Map::new();
        if let Some(rss) = resident_bytes() {
            m.insert("process_resident_bytes".into(), Dynamic::from(rss as INT));
        }
        m
    });
}

pub fn register(api: &mut Api, session: &Arc<Session>) {
    register_loading(api, session);
    register_tokens(api, session);
    register_machine(api, session);
}
