//! F (plain SD) and C (customized with the prompt's concepts, of any method) from the same
//! noise, side by side.
//!
//! With Infusion concepts, in every cross-attention layer of C's conditional pass C uses F's
//! conditional attention probabilities of the same layer and step and the values with each
//! concept's Δ added at its word's tokens (`crate::infusion::hook`); the other methods change
//! C's text, hooks or UNet ([`super::side`]). Both trajectories run in one batched UNet call per
//! step: `[uncond_F, cond_F, uncond_C, cond_C]`.

use candle_core::Tensor;

use super::prompt::{place_concepts, ParsedPrompt, Placement};
use super::set::ConceptSet;
use super::side::{custom_side, side_marks};
use crate::error::{Error, Result};
use crate::infusion::hook::{FMaps, InfusionHook, SampleEdit, ValueOffsets};
use crate::infusion::maps::AttentionMaps;
use crate::infusion::Stream;
use crate::job::Job;
use crate::sd::hook::{AttentionHook, Chain};
use crate::sd::pipeline::{Denoise, GenerateOptions, StableDiffusion, Trajectory};
use crate::sd::tokenizer::Tokens;

/// Settings of a generation of F and C.
#[derive(Debug, Clone)]
pub struct PairOptions {
    pub generate: GenerateOptions,
    /// Fraction of the steps (from the first) in which C uses F's attention maps; after that C
    /// computes its own (with the Δs still applied). 1.0 (all steps) as in the paper.
    pub replace_steps: f64,
}

impl Default for PairOptions {
    fn default() -> Self {
        GenerateOptions::default().into()
    }
}

/// The pair of a generation's settings, C using F's maps in every step (the paper's).
impl From<GenerateOptions> for PairOptions {
    fn from(generate: GenerateOptions) -> Self {
        Self {
            generate,
            replace_steps: 1.0,
        }
    }
}

/// A concept a generation used, as its PNGs record it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct UsedConcept {
    pub name: String,
    /// `infusion`, `textual_inversion`, `lora`, `dreambooth`.
    pub method: String,
    /// The class word F saw.
    pub word: String,
    /// The identifier C's prompt put before the word (LoRA, DreamBooth).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trigger: Option<String>,
    /// A LoRA's strength.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scale: Option<f64>,
}

impl UsedConcept {
    /// `<cat> lora (cat, trigger sks, scale 0.8)`.
    fn describe(&self) -> String {
        let mut parts = vec![self.word.clone()];
        if let Some(t) = &self.trigger {
            parts.push(format!("trigger {t}"));
        }
        if let Some(s) = self.scale {
            parts.push(format!("scale {s}"));
        }
        format!("<{}> {} ({})", self.name, self.method, parts.join(", "))
    }
}

/// What the concepts of `parsed`'s marks are, in prompt order.
fn used_concepts(concepts: &ConceptSet, parsed: &ParsedPrompt) -> Vec<UsedConcept> {
    parsed
        .marks
        .iter()
        .filter_map(|m| {
            let c = concepts.get(&m.name)?;
            Some(UsedConcept {
                name: c.name().to_string(),
                method: c.method().into(),
                word: c.word().to_string(),
                trigger: c.provenance().trigger,
                scale: c.scale(),
            })
        })
        .collect()
}

/// The result of a generation of F and C: the base (F) and customized (C) images from the same
/// noise.
#[derive(Debug, Clone)]
pub struct PairGeneration {
    /// The prompt as written, with `<name>` marks.
    pub prompt: String,
    pub parsed: ParsedPrompt,
    pub tokens: Tokens,
    pub options: PairOptions,
    /// The UNet's timestep at each call of the sampler.
    pub timesteps: Vec<f64>,
    /// Names of the concepts used, in prompt order.
    pub concepts: Vec<String>,
    /// What each of them is (method, word, trigger, strength), in prompt order.
    pub used: Vec<UsedConcept>,
    /// C's prompt, where it is not F's (a trigger word: `a sks teapot`).
    pub custom_prompt: Option<String>,
    /// The model it was made with: its name and the fingerprint of its UNet.
    pub model: String,
    pub model_hash: String,
    pub base_latents: Tensor,
    pub custom_latents: Tensor,
    /// `(1, 3, H, W)` in [0, 1], f32.
    pub base_image: Tensor,
    pub custom_image: Tensor,
}

impl PairGeneration {
    /// True when a concept was used (otherwise C is F and the images are the same).
    pub fn is_customized(&self) -> bool {
        !self.concepts.is_empty()
    }

    /// True when an Infusion concept was used (so `replace_steps` meant something).
    pub fn uses_infusion(&self) -> bool {
        self.used.iter().any(|u| u.method == "infusion")
    }

    /// The text chunks of the PNGs: prompt and settings, and the concepts when there are.
    pub fn png_text(&self) -> Vec<(&'static str, String)> {
        let g = &self.options.generate;
        let mut text = vec![
            ("parameters", self.parameters()),
            ("prompt", self.prompt.clone()),
        ];
        if self.is_customized() {
            text.push(("base_prompt", self.parsed.base.clone()));
            if let Some(p) = &self.custom_prompt {
                text.push(("custom_prompt", p.clone()));
            }
            text.push(("concepts", self.concepts.join(",")));
            text.push((
                "concept_details",
                serde_json::to_string(&self.used).unwrap_or_default(),
            ));
        }
        text.extend([
            ("negative_prompt", g.negative_prompt.clone()),
            ("seed", g.seed.to_string()),
            ("steps", g.steps.to_string()),
            ("scheduler", g.sampler.describe()),
            ("guidance", g.guidance.to_string()),
        ]);
        if self.uses_infusion() {
            text.push(("replace_steps", self.options.replace_steps.to_string()));
        }
        text.push((
            "software",
            format!("infusion-repl {}", env!("CARGO_PKG_VERSION")),
        ));
        text
    }

    /// The settings as AUTOMATIC1111's web UI writes them in its `parameters` PNG chunk (which
    /// image viewers and other tools read): the prompt, the negative prompt, then one line of
    /// `key: value`s.
    pub fn parameters(&self) -> String {
        let g = &self.options.generate;
        let (_, _, h, w) = self.base_image.dims4().unwrap_or((1, 3, 0, 0));
        let hash: String = self
            .model_hash
            .trim_start_matches("sha256:")
            .chars()
            .take(10)
            .collect();
        let mut line = format!(
            "Steps: {}, Sampler: {}, CFG scale: {}, Seed: {}, Size: {w}x{h}, Model hash: {hash}, \
             Model: {}",
            g.steps,
            g.sampler.a1111_name(),
            g.guidance,
            g.seed,
            self.model
        );
        if self.is_customized() {
            let described: Vec<String> = self.used.iter().map(UsedConcept::describe).collect();
            // Quoted: A1111 reads a quoted value whole, commas and all.
            line.push_str(&format!(
                ", Concepts: {}",
                serde_json::Value::String(described.join("; "))
            ));
        }
        if self.uses_infusion() {
            line.push_str(&format!(
                ", Infusion replace steps: {}",
                self.options.replace_steps
            ));
        }
        let mut s = self.prompt.clone();
        if !g.negative_prompt.is_empty() {
            s.push_str(&format!("\nNegative prompt: {}", g.negative_prompt));
        }
        s.push('\n');
        s.push_str(&line);
        s
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

    /// Writes the PNGs, the prompt and settings in their text chunks: with concepts, `OUT`
    /// (base | customized side by side), `OUT.base.png` and `OUT.custom.png` (OUT's extension
    /// replaced); without, the one image as `OUT`. Returns the paths written.
    pub fn save(&self, out: &std::path::Path) -> Result<Vec<std::path::PathBuf>> {
        use crate::util::image_io::{encode_png, hstack, tensor_to_rgb};
        let base = tensor_to_rgb(&self.base_image)?;
        let text = self.png_text();
        let mut files = vec![];
        if self.is_customized() {
            let custom = tensor_to_rgb(&self.custom_image)?;
            let pair = hstack(&[base.clone(), custom.clone()])?;
            for (path, img) in [
                (out.to_path_buf(), &pair),
                (out.with_extension("base.png"), &base),
                (out.with_extension("custom.png"), &custom),
            ] {
                let bytes = encode_png(img, &path, &text)?;
                files.push((path, bytes));
            }
        } else {
            files.push((out.to_path_buf(), encode_png(&base, out, &text)?));
        }
        // All of them or none: the set is written to temporary files first.
        crate::util::fs::write_all_atomic(&files)?;
        Ok(files.into_iter().map(|(p, _)| p).collect())
    }
}

/// The prompt parsed, tokenized and its concepts placed (and checked against `sd`).
fn place(
    sd: &StableDiffusion,
    concepts: &ConceptSet,
    prompt: &str,
    job: &Job,
) -> Result<(ParsedPrompt, Tokens, Vec<Placement>)> {
    let parsed = concepts.parse(prompt)?;
    let tokens = sd.tokenize(&parsed.base)?;
    if tokens.truncated() {
        job.warn(format!(
            "the prompt {:?} has {} tokens, the text encoder takes {}: the end is cut off",
            parsed.base,
            tokens.untruncated_n_tokens,
            sd.tokenizer.max_len()
        ));
    }
    let placements = place_concepts(concepts, &parsed, &tokens)?;
    for p in &placements {
        concepts.check(p.concept.name(), sd, job)?;
    }
    Ok((parsed, tokens, placements))
}

/// Infusion's hook for one prompt: its concepts' offsets, F's maps shared in the batch.
fn hook<'a>(
    sd: &StableDiffusion,
    placements: &[Placement],
    keys: usize,
    opts: &PairOptions,
    capture: Option<&'a AttentionMaps>,
) -> Result<InfusionHook<'a>> {
    let edit: SampleEdit<'_> = placements
        .iter()
        .filter_map(|p| Some((p.positions.as_slice(), p.deltas()?)))
        .collect();
    let offsets = ValueOffsets::new(
        &[edit],
        &sd.unet.attention_layers(),
        keys,
        sd.device(),
        sd.dtype(),
    )?;
    // Without Infusion concepts (the hook then only captures maps) C keeps its own attention.
    let calls = sd.plan(&opts.generate)?.len();
    let replace_until = if placements.is_empty() {
        0
    } else {
        (opts.replace_steps * calls as f64).round() as usize
    };
    Ok(InfusionHook::new(offsets, FMaps::InBatch)
        .replace_until(replace_until)
        .capture(capture))
}

/// Generates F and C side by side. A prompt without concepts runs F alone, and C is F.
pub fn generate_pair(
    sd: &StableDiffusion,
    concepts: &ConceptSet,
    prompt: &str,
    opts: &PairOptions,
    capture: Option<&AttentionMaps>,
    job: &Job,
) -> Result<PairGeneration> {
    if !(0.0..=1.0).contains(&opts.replace_steps) {
        return Err(Error::arg(
            "replace_steps",
            format!("{} is not a fraction in [0, 1]", opts.replace_steps),
        ));
    }
    let g = &opts.generate;
    let (parsed, tokens, placements) = place(sd, concepts, prompt, job)?;
    // Everything checked before the first tensor: F and C are 4 UNet rows, F alone 2.
    sd.check_generate(g, if placements.is_empty() { 2 } else { 4 })?;
    let negative = sd.tokenize(&g.negative_prompt)?;
    let states = sd.text_states(&[&negative, &tokens])?;
    // The concepts that change more than Infusion's residuals: C's text, hooks and UNet.
    let marks = side_marks(concepts, &parsed);
    let other = custom_side(
        sd,
        &parsed.base,
        &g.negative_prompt,
        &marks,
        Stream::Customized.branch(),
    )?;
    if other.changes_text_or_unet() && !placements.is_empty() {
        return Err(Error::arg(
            "prompt",
            format!(
                "Infusion concepts use F's text and attention in C, which a learned word, a \
                 trigger word or a LoRA of the text encoder changes (C's prompt is {:?}): use \
                 them in separate prompts",
                other.prompt
            ),
        ));
    }
    let traj = |stream: Stream| -> Result<Trajectory> {
        let cond = match (&other.states, stream) {
            (Some(s), Stream::Customized) => s.clone(),
            _ => states.get(1)?.unsqueeze(0)?,
        };
        let uncond = match (&other.uncond, stream) {
            (Some(s), Stream::Customized) => s.clone(),
            _ => states.get(0)?.unsqueeze(0)?,
        };
        Ok(Trajectory {
            branch: stream.branch(),
            sample: 0,
            uncond,
            cond,
        })
    };
    // Without concepts C is F: F runs alone (with the hook only to capture maps).
    let customized = !parsed.marks.is_empty();
    let trajectories = if customized {
        vec![traj(Stream::Foundational)?, traj(Stream::Customized)?]
    } else {
        vec![traj(Stream::Foundational)?]
    };
    let hook = hook(sd, &placements, tokens.ids.len(), opts, capture)?;
    let hooks: Vec<&dyn AttentionHook> = (!placements.is_empty() || capture.is_some())
        .then_some(&hook as &dyn AttentionHook)
        .into_iter()
        .chain(other.hooks.iter().map(|h| h.as_ref()))
        .collect();
    let chain = Chain(hooks);
    let unets: Vec<(crate::sd::hook::Branch, &crate::sd::unet::UNet)> = other
        .unet
        .as_deref()
        .map(|u| (Stream::Customized.branch(), u))
        .into_iter()
        .collect();
    let init = sd.initial_latents(g)?;
    let run = Denoise::new(&init, &trajectories, g)
        .hook((!chain.0.is_empty()).then_some(&chain as &dyn AttentionHook))
        .unets(&unets);
    let out = sd.denoise(&run, job, &mut |_| Ok(()))?;
    let base_latents = out[0].clone();
    let custom_latents = out.last().cloned().unwrap_or_else(|| base_latents.clone());
    let images = sd.decode_to_unit(&Tensor::cat(&out, 0)?)?;
    let base_image = images.get(0)?.unsqueeze(0)?;
    let custom_image = images.get(out.len() - 1)?.unsqueeze(0)?;
    Ok(PairGeneration {
        prompt: prompt.to_string(),
        concepts: parsed.marks.iter().map(|m| m.name.clone()).collect(),
        used: used_concepts(concepts, &parsed),
        custom_prompt: (other.prompt != parsed.base).then(|| other.prompt.clone()),
        model: sd.name(),
        model_hash: sd.unet_fingerprint().to_string(),
        parsed,
        tokens,
        options: opts.clone(),
        timesteps: sd.plan(g)?.timesteps().to_vec(),
        base_latents,
        custom_latents,
        base_image,
        custom_image,
    })
}
