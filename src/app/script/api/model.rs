//! Models and generations in scripts.

use std::path::Path;
use std::sync::Arc;

use rhai::{Array, Dynamic, Engine, Map, FLOAT, INT};

use super::images::Img;
use super::tensors::TensorVal;
use super::volatile;
use crate::actions;
use crate::app::script::{err, rt, Opts, RhaiResult, Session};
use crate::infusion::generate::{generate_infusion, InfusionGeneration, InfusionOptions};
use crate::infusion::maps::{overlay, token_map, AttentionMaps};
use crate::infusion::Stream;
use crate::sd::fused::{kernels, set_thread_kernels};
use crate::sd::pipeline::{load_noise, GenerateOptions, StableDiffusion};
use crate::util::image_io::tensor_to_rgb;
use crate::util::text_render::labelled_row;

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
            "Model({} on {:?}, {:?}, {}px)",
            self.source,
            self.sd.device(),
            self.sd.dtype(),
            self.sd.default_size()
        )
    }
}

/// A generation: the base (F) and customized (C) images, their latents, attention maps.
#[derive(Clone)]
pub struct Gen {
    pub g: Arc<InfusionGeneration>,
    pub maps: Option<Arc<AttentionMaps>>,
}

impl std::fmt::Display for Gen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Generation({:?}, seed {}, {} steps, concepts [{}])",
            self.g.prompt,
            self.g.options.generate.seed,
            self.g.options.generate.steps,
            self.g.concepts.join(", ")
        )
    }
}

fn load(session: &Session, spec: Option<&str>, opts: Option<&Map>) -> RhaiResult<Model> {
    let mut device = session.config.device.clone();
    let mut dtype = session.config.dtype.clone();
    if let Some(m) = opts {
        let o = Opts::new(m, "load_model", &["device", "dtype"])?;
        device = o.string("device")?.unwrap_or(device);
        dtype = o.string("dtype")?.unwrap_or(dtype);
    }
    let spec = spec
        .map(str::to_string)
        .or_else(|| session.config.model.clone());
    let loaded = rt(actions::load_model(
        spec.as_deref(),
        &device,
        &dtype,
        &session.job,
    ))?;
    let model = Model {
        sd: Arc::new(loaded.sd),
        source: loaded.source,
    };
    *session.model.lock().unwrap_or_else(|e| e.into_inner()) = Some(model.clone());
    Ok(model)
}

const GENERATE_OPTIONS: &[&str] = &[
    "seed",
    "steps",
    "guidance",
    "negative",
    "width",
    "height",
    "noise",
    "replace_steps",
    "maps",
];

fn generate(session: &Session, model: &Model, prompt: &str, opts: &Map) -> RhaiResult<Gen> {
    let o = Opts::new(opts, "generate", GENERATE_OPTIONS)?;
    let d = GenerateOptions::default();
    let generate = GenerateOptions {
        negative_prompt: o.string("negative")?.unwrap_or_default(),
        seed: o.int("seed")?.map(|s| s as u64).unwrap_or(d.seed),
        steps: o.usize("steps")?.unwrap_or(d.steps),
        guidance: o.float("guidance")?.unwrap_or(d.guidance),
        width: o.usize("width")?,
        height: o.usize("height")?,
        noise: o
            .string("noise")?
            .map(|p| rt(load_noise(Path::new(&p))))
            .transpose()?,
    };
    let maps = match o.get_maps()? {
        MapsMode::Off => None,
        MapsMode::Light => Some(Arc::new(AttentionMaps::light(256))),
        MapsMode::All => Some(Arc::new(AttentionMaps::new(true))),
    };
    let opts = InfusionOptions {
        generate,
        replace_steps: o.float("replace_steps")?.unwrap_or(1.0),
    };
    let concepts = session
        .concepts
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    session.job.reset();
    let g = rt(generate_infusion(
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

enum MapsMode {
    Off,
    Light,
    All,
}

impl Opts<'_> {
    fn get_maps(&self) -> RhaiResult<MapsMode> {
        if let Ok(Some(b)) = self.bool("maps") {
            return Ok(if b { MapsMode::Light } else { MapsMode::Off });
        }
        match self.string("maps")?.as_deref() {
            None | Some("light") => Ok(MapsMode::Light),
            Some("all") => Ok(MapsMode::All),
            Some("off") => Ok(MapsMode::Off),
            Some(o) => Err(err(format!(
                "generate: option `maps` is \"light\", \"all\", \"off\" or true/false, not {o:?}"
            ))),
        }
    }
}

fn stream_of(s: &str) -> RhaiResult<Stream> {
    match s {
        "F" | "f" | "base" => Ok(Stream::Foundational),
        "C" | "c" | "custom" => Ok(Stream::Customized),
        o => Err(err(format!(
            "stream {o:?}: expected \"F\" (base) or \"C\" (custom)"
        ))),
    }
}

impl Gen {
    fn maps(&self) -> RhaiResult<&AttentionMaps> {
        self.maps.as_deref().ok_or_else(|| {
            err("this generation kept no attention maps (generate with #{maps: true})")
        })
    }

    fn image(&self, stream: Stream) -> RhaiResult<Img> {
        let t = match stream {
            Stream::Foundational => &self.g.base_image,
            Stream::Customized => &self.g.custom_image,
        };
        Ok(Img::with_text(rt(tensor_to_rgb(t))?, self.g.png_text()))
    }

    /// `(h, w, keys)` map of one stream: aggregated, or of one layer (and step).
    fn map(&self, stream: Stream, o: &Opts) -> RhaiResult<candle_core::Tensor> {
        let maps = self.maps()?;
        let res = o.usize("resolution")?.map(|r| (r, r));
        match o.string("layer")? {
            Some(layer) => rt(maps.layer_map(stream, &layer, o.usize("step")?)),
            None => {
                if o.usize("step")?.is_some() {
                    return Err(err("attention: `step` needs a `layer`"));
                }
                rt(maps.aggregate(stream, res))
            }
        }
    }

    /// The overlays of `word` for the streams asked for, labelled.
    fn attention(&self, word: &str, opts: &Map) -> RhaiResult<Img> {
        let o = Opts::new(
            opts,
            "attention",
            &["stream", "layer", "step", "resolution"],
        )?;
        let streams = match o.string("stream")? {
            None => vec![Stream::Foundational, Stream::Customized],
            Some(s) => vec![stream_of(&s)?],
        };
        let positions = rt(self.g.word_positions(word))?;
        let mut tiles = vec![];
        for s in streams {
            let m = rt(token_map(&self.map(s, &o)?, &positions))?;
            let base = self.image(s)?;
            let tag = if s == Stream::Foundational { "F" } else { "C" };
            tiles.push((rt(overlay(&base.rgb, &m, 0.6))?, format!("{tag} {word}")));
        }
        Ok(Img::new(labelled_row(&tiles)))
    }

    /// One tile per prompt token (bos and eos left out) with the token under it.
    fn tiles(&self, stream: Stream) -> RhaiResult<Img> {
        let agg = self.map(stream, &Opts::new(&Map::new(), "attention_tiles", &[])?)?;
        let base = self.image(stream)?;
        let tokens = &self.g.tokens;
        let mut tiles = vec![];
        for p in 1..tokens.n_tokens.saturating_sub(1) {
            let m = rt(token_map(&agg, &[p]))?;
            let label = tokens.tokens[p].trim_end_matches("</w>").to_string();
            tiles.push((rt(overlay(&base.rgb, &m, 0.7))?, label));
        }
        if tiles.is_empty() {
            return Err(err("attention_tiles: the prompt has no tokens"));
        }
        Ok(Img::new(labelled_row(&tiles)))
    }
}

fn tokens(
    session: &Session,
    model: &Model,
    prompt: &str,
) -> RhaiResult<(crate::sd::tokenizer::Tokens, String)> {
    let concepts = session.concepts.read().unwrap_or_else(|e| e.into_inner());
    let base = concepts
        .parse(prompt)
        .map(|p| p.base)
        .unwrap_or_else(|_| prompt.to_string());
    Ok((rt(model.sd.tokenize(&base))?, base))
}

pub fn register(engine: &mut Engine, session: &Arc<Session>) {
    engine.register_type_with_name::<Model>("Model");
    engine.register_fn("to_string", |m: &mut Model| m.to_string());
    engine.register_fn("to_debug", |m: &mut Model| m.to_string());
    engine.register_get("size", |m: &mut Model| m.sd.default_size() as INT);
    engine.register_get("source", |m: &mut Model| m.source.clone());
    engine.register_get("fingerprint", |m: &mut Model| {
        m.sd.unet_fingerprint().to_string()
    });

    volatile!(engine, "kernels", || kernels().to_string());
    volatile!(engine, "set_kernels", |name: &str| -> RhaiResult<()> {
        set_thread_kernels(name.parse().map_err(err)?);
        Ok(())
    });

    let s = session.clone();
    volatile!(engine, "load_model", move || load(&s, None, None));
    let s = session.clone();
    volatile!(engine, "load_model", move |spec: &str| load(
        &s,
        Some(spec),
        None
    ));
    let s = session.clone();
    volatile!(engine, "load_model", move |spec: &str, o: Map| load(
        &s,
        Some(spec),
        Some(&o)
    ));

    let s = session.clone();
    volatile!(engine, "generate", move |m: &mut Model, prompt: &str| {
        generate(&s, m, prompt, &Map::new())
    });
    let s = session.clone();
    volatile!(
        engine,
        "generate",
        move |m: &mut Model, prompt: &str, o: Map| generate(&s, m, prompt, &o)
    );

    let s = session.clone();
    engine.register_fn(
        "tokens",
        move |m: &mut Model, prompt: &str| -> RhaiResult<Array> {
            let (t, _) = tokens(&s, m, prompt)?;
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
    let s = session.clone();
    engine.register_fn(
        "token_ids",
        move |m: &mut Model, prompt: &str| -> RhaiResult<Array> {
            let (t, _) = tokens(&s, m, prompt)?;
            Ok(t.ids.iter().map(|&i| Dynamic::from(i as INT)).collect())
        },
    );

    engine.register_type_with_name::<Gen>("Generation");
    engine.register_fn("to_string", |g: &mut Gen| g.to_string());
    engine.register_fn("to_debug", |g: &mut Gen| g.to_string());
    engine.register_get("base", |g: &mut Gen| g.image(Stream::Foundational));
    engine.register_get("custom", |g: &mut Gen| g.image(Stream::Customized));
    engine.register_get("base_latents", |g: &mut Gen| {
        TensorVal::new(g.g.base_latents.clone())
    });
    engine.register_get("custom_latents", |g: &mut Gen| {
        TensorVal::new(g.g.custom_latents.clone())
    });
    engine.register_get("prompt", |g: &mut Gen| g.g.prompt.clone());
    engine.register_get("base_prompt", |g: &mut Gen| g.g.parsed.base.clone());
    engine.register_get("seed", |g: &mut Gen| g.g.options.generate.seed as INT);
    engine.register_get("steps", |g: &mut Gen| g.g.options.generate.steps as INT);
    engine.register_get("guidance", |g: &mut Gen| {
        g.g.options.generate.guidance as FLOAT
    });
    engine.register_get("concepts", |g: &mut Gen| -> Array {
        g.g.concepts
            .iter()
            .map(|c| Dynamic::from(c.clone()))
            .collect()
    });
    engine.register_fn("attention", |g: &mut Gen, word: &str| {
        g.attention(word, &Map::new())
    });
    engine.register_fn("attention", |g: &mut Gen, word: &str, o: Map| {
        g.attention(word, &o)
    });
    engine.register_fn("attention_tiles", |g: &mut Gen| g.tiles(Stream::Customized));
    engine.register_fn("attention_tiles", |g: &mut Gen, stream: &str| {
        g.tiles(stream_of(stream)?)
    });
    volatile!(engine, "save", |g: &mut Gen,
                               path: &str|
     -> RhaiResult<Array> {
        let paths = rt(g.g.save(Path::new(path)))?;
        Ok(paths
            .into_iter()
            .map(|p| Dynamic::from(p.display().to_string()))
            .collect())
    });
    volatile!(engine, "save_maps", |g: &mut Gen,
                                    path: &str|
     -> RhaiResult<()> {
        rt(g.maps()?.save(Path::new(path)))
    });

    let s = session.clone();
    volatile!(engine, "device_info", move || -> Map {
        let mut m = Map::new();
        m.insert(
            "default_device".into(),
            Dynamic::from(s.config.device.clone()),
        );
        m.insert(
            "default_dtype".into(),
            Dynamic::from(s.config.dtype.clone()),
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
        if let Some(model) = s.model.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            m.insert("model".into(), Dynamic::from(model.to_string()));
        }
        m
    });
    volatile!(engine, "memory_info", || -> Map {
        let mut m = Map::new();
        if let Some(rss) = resident_bytes() {
            m.insert("process_resident_bytes".into(), Dynamic::from(rss as INT));
        }
        m
    });
}

/// Resident memory of this process (Linux).
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}
