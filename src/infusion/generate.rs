//! Infusion generation: F (plain SD) and C (customized) from the same noise, side by side.
//!
//! In every cross-attention layer of C's conditional pass, C uses F's conditional attention
//! probabilities of the same layer and step (its own softmax is never computed) and the values
//! with each concept's Δ added at the token positions of its word. Unconditional rows and
//! self-attention are untouched. Both trajectories run in one batched UNet call per step:
//! `[uncond_F, cond_F, uncond_C, cond_C]`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::sd::attention::{
    AttentionCall, AttentionHook, AttnKind, AttnSite, Guidance, LayerInfo, Stream,
};
use crate::infusion::maps::AttentionMaps;
use crate::infusion::concept::Concept;
use crate::error::{Error, Result};
use crate::job::Job;
use crate::sd::pipeline::{GenerateOptions, StableDiffusion, Trajectory};
use crate::infusion::prompt::{parse_prompt, ParsedPrompt};
use crate::sd::tokenizer::Tokens;

/// The concepts of a session, found by name.
#[derive(Debug, Clone, Default)]
pub struct ConceptSet {
    concepts: BTreeMap<String, Arc<Concept>>,
}

impl ConceptSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) a concept; returns the one it replaced.
    pub fn insert(&mut self, concept: Concept) -> Option<Arc<Concept>> {
        self.concepts
            .insert(concept.name.clone(), Arc::new(concept))
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Concept>> {
        self.concepts.get(name)
    }

    pub fn remove(&mut self, name: &str) -> Option<Arc<Concept>> {
        self.concepts.remove(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Concept>> {
        self.concepts.values()
    }

    pub fn len(&self) -> usize {
        self.concepts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.concepts.is_empty()
    }

    /// Reads a concept file, checks it against `sd` (layers, lengths, base model; `force` accepts a
    /// concept trained on another model) and adds it. Returns it with the warnings to show.
    pub fn load_file(
        &mut self,
        path: &std::path::Path,
        sd: &StableDiffusion,
        force: bool,
    ) -> Result<(Arc<Concept>, Vec<String>)> {
        let concept = Concept::load(path)?;
        let warnings = concept
            .check_model(sd.unet.attention_layers(), sd.unet_fingerprint(), force)
            .map_err(|e| match e {
                Error::InvalidArgument { msg, .. } => Error::Config {
                    path: path.to_path_buf(),
                    msg,
                },
                e => e,
            })?;
        let concept = Arc::new(concept);
        self.concepts.insert(concept.name.clone(), concept.clone());
        Ok((concept, warnings))
    }

    /// Parses `<name>` marks of a prompt against these concepts.
    pub fn parse(&self, prompt: &str) -> Result<ParsedPrompt> {
        parse_prompt(prompt, |n| self.get(n).map(|c| c.word.clone()))
    }
}

/// Settings of an Infusion generation.
#[derive(Debug, Clone)]
pub struct InfusionOptions {
    pub generate: GenerateOptions,
    /// Fraction of the steps (from the first) in which C uses F's attention maps; after that C
    /// computes its own (with the Δs still applied). 1.0 (all steps) as in the paper.
    pub replace_steps: f64,
}

impl Default for InfusionOptions {
    fn default() -> Self {
        Self {
            generate: GenerateOptions::default(),
            replace_steps: 1.0,
        }
    }
}

/// A concept placed in a prompt: its Δs and the token positions of its word.
#[derive(Debug, Clone)]
pub struct Placement {
    pub concept: Arc<Concept>,
    pub positions: Vec<usize>,
}

/// Resolves the marks of `parsed` to token positions in `tokens` (the tokenized base prompt).
pub fn place_concepts(
    concepts: &ConceptSet,
    parsed: &ParsedPrompt,
    tokens: &Tokens,
) -> Result<Vec<Placement>> {
    parsed
        .marks
        .iter()
        .map(|m| {
            let concept = concepts
                .get(&m.name)
                .ok_or_else(|| Error::arg("prompt", format!("no concept named <{}> is loaded", m.name)))?
                .clone();
            let positions = tokens.positions_of_span(m.span.clone());
            if positions.is_empty() {
                return Err(Error::arg(
                    "prompt",
                    format!(
                        "the word of <{}> was cut off: the prompt has {} tokens, the text encoder takes {}",
                        m.name,
                        tokens.untruncated_n_tokens,
                        tokens.ids.len()
                    ),
                ));
            }
            Ok(Placement { concept, positions })
        })
        .collect()
}

/// Per cross-attention layer, what C's values get added: a `(1, keys, inner)` tensor with each
/// concept's Δ at its positions, on `device` in `dtype`.
pub fn value_offsets(
    placements: &[Placement],
    layers: &[&LayerInfo],
    keys: usize,
    device: &Device,
    dtype: DType,
) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for l in layers.iter().filter(|l| l.kind == AttnKind::CrossAttention) {
        let inner = l.inner_dim();
        let mut add = vec![0f32; keys * inner];
        for p in placements {
            let delta: Vec<f32> = p
                .concept
                .deltas
                .get(&l.path)
                .ok_or_else(|| {
                    Error::arg(
                        "concept",
                        format!("<{}> has no Δ for layer `{}`", p.concept.name, l.path),
                    )
                })?
                .to_vec1()?;
            if delta.len() != inner {
                return Err(Error::arg(
                    "concept",
                    format!(
                        "<{}>: Δ of `{}` has {} values, the layer has {inner}",
                        p.concept.name,
                        l.path,
                        delta.len()
                    ),
                ));
            }
            for &k in &p.positions {
                for (a, d) in add[k * inner..(k + 1) * inner].iter_mut().zip(&delta) {
                    *a += d;
                }
            }
        }
        let t = Tensor::from_vec(add, (1, keys, inner), device)?.to_dtype(dtype)?;
        out.insert(l.path.clone(), t);
    }
    Ok(out)
}

/// The Infusion attention hook for batched F/C generation.
pub struct InfusionHook<'a> {
    offsets: HashMap<String, Tensor>,
    /// Steps with an index below this use F's maps in C.
    replace_until: usize,
    capture: Option<&'a AttentionMaps>,
}

impl<'a> InfusionHook<'a> {
    pub fn new(
        offsets: HashMap<String, Tensor>,
        replace_until: usize,
        capture: Option<&'a AttentionMaps>,
    ) -> Self {
        Self {
            offsets,
            replace_until,
            capture,
        }
    }
}

impl AttentionHook for InfusionHook<'_> {
    fn wants(&self, layer: &LayerInfo) -> bool {
        layer.kind == AttnKind::CrossAttention
    }

    fn attend(&self, site: &AttnSite<'_>, call: &mut AttentionCall) -> candle_core::Result<()> {
        let replace = site.step.is_none_or(|s| s.index < self.replace_until);
        let rows = site.rows.rows();
        let mut custom_rows = vec![];
        for (r, row) in rows.iter().enumerate() {
            if row.stream != Stream::Customized || row.guidance != Guidance::Conditional {
                continue;
            }
            custom_rows.push(r);
            if replace {
                let f = site
                    .rows
                    .find(Stream::Foundational, Guidance::Conditional, row.sample)
                    .ok_or_else(|| {
                        candle_core::Error::Msg(format!(
                            "no foundational row for customized sample {}",
                            row.sample
                        ))
                    })?;
                call.share_probs(r, f)?;
            }
        }
        if let Some(offset) = self.offsets.get(&site.layer.path) {
            if !custom_rows.is_empty() {
                let v = call.values().clone();
                let mask: Vec<f32> = (0..rows.len())
                    .map(|r| if custom_rows.contains(&r) { 1.0 } else { 0.0 })
                    .collect();
                let mask =
                    Tensor::from_vec(mask, (rows.len(), 1, 1), v.device())?.to_dtype(v.dtype())?;
                call.set_values((&v + mask.broadcast_mul(offset)?)?)?;
            }
        }
        if let Some(capture) = self.capture {
            capture.record(site, call)?;
        }
        Ok(())
    }
}

/// The result of an Infusion generation: the base (F) and customized (C) images from the same
/// noise.
#[derive(Debug, Clone)]
pub struct InfusionGeneration {
    /// The prompt as written, with `<name>` marks.
    pub prompt: String,
    pub parsed: ParsedPrompt,
    pub tokens: Tokens,
    pub options: InfusionOptions,
    pub timesteps: Vec<usize>,
    /// Names of the concepts used, in prompt order.
    pub concepts: Vec<String>,
    pub base_latents: Tensor,
    pub custom_latents: Tensor,
    /// `(1, 3, H, W)` in [0, 1], f32.
    pub base_image: Tensor,
    pub custom_image: Tensor,
}

impl InfusionGeneration {
    /// The text chunks of the PNGs: prompt, concepts and settings.
    pub fn png_text(&self) -> Vec<(&'static str, String)> {
        let g = &self.options.generate;
        vec![
            ("prompt", self.prompt.clone()),
            ("base_prompt", self.parsed.base.clone()),
            ("concepts", self.concepts.join(",")),
            ("negative_prompt", g.negative_prompt.clone()),
            ("seed", g.seed.to_string()),
            ("steps", g.steps.to_string()),
            ("guidance", g.guidance.to_string()),
            ("replace_steps", self.options.replace_steps.to_string()),
            (
                "software",
                format!("infusion-repl {}", env!("CARGO_PKG_VERSION")),
            ),
        ]
    }

    /// Token positions of `word` in the prompt: `<name>` for a concept's word, or a word of the
    /// base prompt (every occurrence).
    pub fn word_positions(&self, word: &str) -> Result<Vec<usize>> {
        let word = word.trim();
        let positions: Vec<usize> = match word.strip_prefix('<').and_then(|w| w.strip_suffix('>')) {
            Some(name) => self
                .parsed
                .marks
                .iter()
                .filter(|m| m.name == name)
                .flat_map(|m| self.tokens.positions_of_span(m.span.clone()))
                .collect(),
            None => self
                .tokens
                .positions_of_word(&self.parsed.base, word)
                .into_iter()
                .flatten()
                .collect(),
        };
        if positions.is_empty() {
            return Err(Error::arg(
                "word",
                format!("{word:?} is not in the prompt {:?}", self.prompt),
            ));
        }
        Ok(positions)
    }

    /// The heat map of `word`'s attention (aggregated over heads, steps and the layers of
    /// `resolution`) over F's or C's image.
    pub fn attention_overlay(
        &self,
        maps: &AttentionMaps,
        stream: Stream,
        word: &str,
        resolution: Option<(usize, usize)>,
    ) -> Result<image::RgbImage> {
        let positions = self.word_positions(word)?;
        let agg = maps.aggregate(stream, resolution)?;
        let map = crate::infusion::maps::token_map(&agg, &positions)?;
        let image = match stream {
            Stream::Foundational => &self.base_image,
            Stream::Customized => &self.custom_image,
        };
        crate::infusion::maps::overlay(&crate::util::image_io::tensor_to_rgb(image)?, &map, 0.6)
    }

    /// Writes `OUT` (base | customized side by side), `OUT.base.png` and `OUT.custom.png`
    /// (OUT's extension replaced). Returns the paths written.
    pub fn save_pngs(&self, out: &std::path::Path) -> Result<Vec<std::path::PathBuf>> {
        use crate::util::image_io::{hstack, save_png, tensor_to_rgb};
        let base = tensor_to_rgb(&self.base_image)?;
        let custom = tensor_to_rgb(&self.custom_image)?;
        let text = self.png_text();
        let base_path = out.with_extension("base.png");
        let custom_path = out.with_extension("custom.png");
        save_png(&hstack(&[base.clone(), custom.clone()])?, out, &text)?;
        save_png(&base, &base_path, &text)?;
        save_png(&custom, &custom_path, &text)?;
        Ok(vec![out.to_path_buf(), base_path, custom_path])
    }
}

/// Generates F and C side by side. A prompt without concepts runs F alone, and C is F.
pub fn generate_infusion(
    sd: &StableDiffusion,
    concepts: &ConceptSet,
    prompt: &str,
    opts: &InfusionOptions,
    capture: Option<&AttentionMaps>,
    job: &Job,
) -> Result<InfusionGeneration> {
    if !(0.0..=1.0).contains(&opts.replace_steps) {
        return Err(Error::arg(
            "replace_steps",
            format!("{} is not a fraction in [0, 1]", opts.replace_steps),
        ));
    }
    let g = &opts.generate;
    let parsed = concepts.parse(prompt)?;
    let tokens = sd.tokenize(&parsed.base)?;
    let placements = place_concepts(concepts, &parsed, &tokens)?;
    let negative = sd.tokenize(&g.negative_prompt)?;
    let states = sd.text_states(&[&negative, &tokens])?;
    let init = sd.initial_latents(g)?;
    let traj = |stream| -> Result<Trajectory> {
        Ok(Trajectory {
            stream,
            sample: 0,
            uncond: states.get(0)?.unsqueeze(0)?,
            cond: states.get(1)?.unsqueeze(0)?,
        })
    };
    let layers = sd.unet.attention_layers();
    let replace_until = (opts.replace_steps * g.steps as f64).round() as usize;
    let (base_latents, custom_latents) = if placements.is_empty() {
        let hook = capture.map(|c| InfusionHook::new(HashMap::new(), 0, Some(c)));
        let out = sd.denoise(
            &init,
            &[traj(Stream::Foundational)?],
            g.steps,
            g.guidance,
            hook.as_ref().map(|h| h as &dyn AttentionHook),
            job,
            &mut |_| Ok(()),
        )?;
        (out[0].clone(), out[0].clone())
    } else {
        let offsets = value_offsets(
            &placements,
            &layers,
            tokens.ids.len(),
            sd.device(),
            sd.dtype(),
        )?;
        let hook = InfusionHook::new(offsets, replace_until, capture);
        let out = sd.denoise(
            &init,
            &[traj(Stream::Foundational)?, traj(Stream::Customized)?],
            g.steps,
            g.guidance,
            Some(&hook),
            job,
            &mut |_| Ok(()),
        )?;
        (out[0].clone(), out[1].clone())
    };
    let (base_image, custom_image) = if placements.is_empty() {
        let image = sd.decode_to_unit(&base_latents)?;
        (image.clone(), image)
    } else {
        let images = sd.decode_to_unit(&Tensor::cat(&[&base_latents, &custom_latents], 0)?)?;
        (images.get(0)?.unsqueeze(0)?, images.get(1)?.unsqueeze(0)?)
    };
    Ok(InfusionGeneration {
        prompt: prompt.to_string(),
        concepts: placements.iter().map(|p| p.concept.name.clone()).collect(),
        parsed,
        tokens,
        options: opts.clone(),
        timesteps: sd.scheduler.timesteps(g.steps),
        base_latents,
        custom_latents,
        base_image,
        custom_image,
    })
}
