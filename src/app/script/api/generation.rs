//! Generations in scripts: their images, latents and settings, attention maps, saving.

use std::path::Path;
use std::sync::Arc;

use rhai::{Array, Dynamic, Map, FLOAT, INT};

use super::images::Img;
use super::tensors::TensorVal;
use super::Api;
use crate::app::script::docs::{FnSpec, Kind};
use crate::app::script::{err, rt, Opts, RhaiResult};
use crate::customize::generate::PairGeneration;
use crate::infusion::maps::{heat_color, overlay, token_map, AttentionMaps};
use crate::infusion::Stream;
use crate::util::image_io::tensor_to_rgb;
use crate::util::text_render::labelled_row;

/// A generation: the base (F) and customized (C) images, their latents, attention maps.
#[derive(Clone)]
pub struct Gen {
    pub g: Arc<PairGeneration>,
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

/// Which attention maps a generation keeps (`generate`'s `maps` option).
pub enum MapsMode {
    Off,
    Light,
    All,
}

impl MapsMode {
    pub fn of(v: Option<Dynamic>) -> RhaiResult<Self> {
        let Some(v) = v else {
            return Ok(MapsMode::Light);
        };
        if let Ok(b) = v.as_bool() {
            return Ok(if b { MapsMode::Light } else { MapsMode::Off });
        }
        match v.clone().into_string().ok().as_deref() {
            Some("light") => Ok(MapsMode::Light),
            Some("all") => Ok(MapsMode::All),
            Some("off") => Ok(MapsMode::Off),
            _ => Err(err(format!(
                "generate: option `maps` is \"light\", \"all\", \"off\" or true/false, not {v}"
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

const STREAMS: &[&str] = &["F", "C", "base", "custom"];

fn attention_spec() -> FnSpec {
    FnSpec::method("Generation", "attention")
        .sig("generation.attention(word) -> Image")
        .sig("generation.attention(word, options) -> Image")
        .doc("The heat map of a word's cross-attention over the image: F's and C's side by side, or one stream. Averaged over heads, steps and the layers of one resolution (the 16x16 ones by default); with layer (a weight path) one layer, with step one step (generate with #{maps: \"all\"} for those). A concept is named as \"<mycat>\".")
        .opt_unset("stream", Kind::Choice(STREAMS), "one stream only: \"F\" (base) or \"C\" (custom)")
        .opt_unset("layer", Kind::Str, "one layer, by its weight path")
        .opt_unset("step", Kind::COUNT, "one denoising step (needs layer)")
        .opt_unset("resolution", Kind::POSITIVE, "the feature-map size whose layers are averaged (e.g. 16)")
        .example("show(g.attention(\"<mycat>\")); show(g.attention(\"book\", #{stream: \"C\"}));")
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
        let res = o.usize("resolution").map(|r| (r, r));
        match o.string("layer") {
            Some(layer) => rt(maps.layer_map(stream, &layer, o.usize("step"))),
            None => {
                if o.usize("step").is_some() {
                    return Err(err("attention: `step` needs a `layer`"));
                }
                rt(maps.aggregate(stream, res))
            }
        }
    }

    /// The overlays of `word` for the streams asked for, labelled.
    fn attention(&self, spec: &FnSpec, word: &str, opts: &Map) -> RhaiResult<Img> {
        let o = Opts::of(opts, spec)?;
        let streams = match o.string("stream") {
            None => vec![Stream::Foundational, Stream::Customized],
            Some(s) => vec![stream_of(&s)?],
        };
        let positions = rt(self.g.word_positions(word))?;
        let mut tiles = vec![];
        for s in streams {
            let m = rt(token_map(&self.map(s, &o)?, &positions))?;
            let base = self.image(s)?;
            tiles.push((
                rt(overlay(&base.rgb, &m, 0.6))?,
                format!("{} {word}", s.tag()),
            ));
        }
        Ok(Img::with_text(
            labelled_row(&tiles, Some(&heat_color)),
            self.g.png_text(),
        ))
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
        Ok(Img::with_text(
            labelled_row(&tiles, Some(&heat_color)),
            self.g.png_text(),
        ))
    }
}

fn register_properties(api: &mut Api) {
    api.ty::<Gen>(
        "Generation",
        "the base (F) and customized (C) images of one prompt and seed (model.generate)",
    );
    const G: &str = "Generation";
    api.get_or_fail(
        (G, "base", "Image"),
        "F's image: plain SD",
        |g: &mut Gen| g.image(Stream::Foundational),
    );
    api.get_or_fail(
        (G, "custom", "Image"),
        "C's image: with the concepts",
        |g: &mut Gen| g.image(Stream::Customized),
    );
    api.get(
        (G, "base_latents", "Tensor"),
        "F's final latents [1, 4, h, w]",
        |g: &mut Gen| TensorVal::new(g.g.base_latents.clone()),
    );
    api.get(
        (G, "custom_latents", "Tensor"),
        "C's final latents [1, 4, h, w]",
        |g: &mut Gen| TensorVal::new(g.g.custom_latents.clone()),
    );
    api.get(
        (G, "prompt", "string"),
        "the prompt as written, with <name> marks",
        |g: &mut Gen| g.g.prompt.clone(),
    );
    api.get(
        (G, "base_prompt", "string"),
        "the prompt as F sees it: marks replaced by class words",
        |g: &mut Gen| g.g.parsed.base.clone(),
    );
    api.get(
        (G, "seed", "int"),
        "the seed of the initial noise",
        |g: &mut Gen| g.g.options.generate.seed as INT,
    );
    api.get((G, "steps", "int"), "the denoising steps", |g: &mut Gen| {
        g.g.options.generate.steps as INT
    });
    api.get(
        (G, "scheduler", "string"),
        "the sampler, with \" karras\" when Karras sigmas were used",
        |g: &mut Gen| g.g.options.generate.sampler.describe(),
    );
    api.get(
        (G, "guidance", "float"),
        "the guidance scale",
        |g: &mut Gen| g.g.options.generate.guidance as FLOAT,
    );
    api.get(
        (G, "concepts", "array"),
        "the names of the concepts used, in prompt order",
        |g: &mut Gen| -> Array {
            g.g.concepts
                .iter()
                .map(|c| Dynamic::from(c.clone()))
                .collect()
        },
    );
}

fn register_methods(api: &mut Api) {
    let spec = api.declare(attention_spec());
    let sp = spec.clone();
    api.func(&spec, move |g: &mut Gen, word: &str| {
        g.attention(&sp, word, &Map::new())
    });
    let sp = spec.clone();
    api.func(&spec, move |g: &mut Gen, word: &str, o: Map| {
        g.attention(&sp, word, &o)
    });
    let spec = api.declare(
        FnSpec::method("Generation", "attention_tiles")
            .sig("generation.attention_tiles() -> Image")
            .sig("generation.attention_tiles(stream) -> Image")
            .doc("One heat-map tile per prompt token, with the token written under it, for C (default) or F.")
            .example("show(g.attention_tiles(\"F\"));"),
    );
    api.func(&spec, |g: &mut Gen| g.tiles(Stream::Customized));
    api.func(&spec, |g: &mut Gen, stream: &str| {
        g.tiles(stream_of(stream)?)
    });
    let spec = api.declare(
        FnSpec::method("Generation", "save")
            .sig("generation.save(path) -> [paths]")
            .doc("Writes the images as PNG, atomically, with the prompt, seed, steps and concepts in text chunks: with concepts base | custom side by side at path plus each alone (.base.png, .custom.png); without, the one image.")
            .example("g.save(\"cat.png\");"),
    );
    api.func(&spec, |g: &mut Gen, path: &str| -> RhaiResult<Array> {
        let paths = rt(g.g.save(Path::new(path)))?;
        Ok(paths
            .into_iter()
            .map(|p| Dynamic::from(p.display().to_string()))
            .collect())
    });
    let spec = api.declare(
        FnSpec::method("Generation", "save_maps")
            .sig("generation.save_maps(path)")
            .doc("Writes the captured attention maps as safetensors: F/<layer> and C/<layer> (mean over steps, shape [h, w, tokens]) and F/<layer>/step<i> for kept steps.")
            .example("g.save_maps(\"maps.safetensors\");"),
    );
    api.func(&spec, |g: &mut Gen, path: &str| -> RhaiResult<()> {
        rt(g.maps()?.save(Path::new(path)))
    });
}

pub fn register(api: &mut Api) {
    register_properties(api);
    register_methods(api);
}
