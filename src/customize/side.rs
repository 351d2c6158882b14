//! C's side of a prompt with concepts that change more than Infusion's residuals: C's text (a
//! learned word's vectors, a trigger word, a text-encoder LoRA), C's hooks (a LoRA's) and C's
//! UNet (DreamBooth's), each as its concept's [`Change`] says. F always sees the plain model
//! with the class word.

use std::ops::Range;

use candle_core::Tensor;

use super::prompt::ParsedPrompt;
use super::set::ConceptSet;
use crate::error::{Error, Result};
use crate::methods::words::{text_states_with, Embedding};
use crate::methods::{Change, CustomConcept, Words};
use crate::sd::hook::{AttentionHook, Branch, Chain};
use crate::sd::pipeline::StableDiffusion;
use crate::sd::unet::UNet;

/// C's side of a prompt: its text (when it differs from F's), its hooks, and its UNet (when a
/// concept gives one).
pub struct CustomSide {
    /// C's prompt (F's base prompt with each concept's words).
    pub prompt: String,
    /// C's conditional text states `(1, tokens, width)`, when they differ from F's.
    pub states: Option<Tensor>,
    /// C's unconditional text states (of the negative prompt), when they differ from F's: a
    /// LoRA of the text encoder changes them too, as diffusers' pipeline encodes both with it.
    pub uncond: Option<Tensor>,
    pub hooks: Vec<Box<dyn AttentionHook>>,
    pub unet: Option<std::sync::Arc<UNet>>,
}

impl CustomSide {
    /// Whether C's text or UNet differs from F's (Infusion's residuals need C's text to be F's,
    /// as C takes F's attention maps).
    pub fn changes_text_or_unet(&self) -> bool {
        self.states.is_some() || self.uncond.is_some() || self.unet.is_some()
    }
}

/// The marks of `parsed` whose concepts change more than Infusion's residuals (C's text, hooks
/// or UNet: what [`custom_side`] takes), at their byte spans of the base prompt.
pub fn side_marks<'c>(
    concepts: &'c ConceptSet,
    parsed: &ParsedPrompt,
) -> Vec<(Range<usize>, &'c dyn CustomConcept)> {
    parsed
        .marks
        .iter()
        .filter_map(|m| {
            let c = concepts.get(&m.name)?;
            c.change()
                .residuals
                .is_none()
                .then(|| (m.span.clone(), c.as_ref()))
        })
        .collect()
}

/// C's side for a prompt that names none of `concepts`, with their changes to the model applied
/// all the same (their hooks, text-encoder changes and UNet; their words go nowhere): the
/// customized model as a fine-tuning method leaves it, which the paper's overfitting measures
/// compare with the plain one on prompts without the concept. Concepts that change only C's
/// words (Textual Inversion) or act only at their words (Infusion) change nothing here.
pub fn model_side(
    sd: &StableDiffusion,
    prompt: &str,
    concepts: &[&dyn CustomConcept],
    branch: Branch,
) -> Result<CustomSide> {
    let mut changes = ModelChanges::default();
    for concept in concepts {
        changes.add(sd, *concept, branch)?;
    }
    let (hooks, text_hooks, unet) = changes.finish(sd, branch, prompt)?;
    let text_chain = Chain(text_hooks.iter().map(|h| h.as_ref()).collect());
    let states = match text_chain.modules() {
        Some(text) => Some(text_states_with(
            sd,
            &sd.tokenize(prompt)?,
            &[],
            Some(text),
        )?),
        None => None,
    };
    Ok(CustomSide {
        prompt: prompt.to_string(),
        uncond: None,
        states,
        hooks,
        unet,
    })
}

/// C's side for the base prompt `base` (the class words in place) and the negative prompt
/// `negative` with `marks`: each concept at its word's byte span of `base`, in order. Hooks
/// change the rows of `branch`. Infusion's residuals are not here: they go through Infusion's
/// hook (see [`super::generate`]).
pub fn custom_side(
    sd: &StableDiffusion,
    base: &str,
    negative: &str,
    marks: &[(Range<usize>, &dyn CustomConcept)],
    branch: Branch,
) -> Result<CustomSide> {
    let mut prompt = String::with_capacity(base.len());
    let mut at = 0;
    let mut learned: Vec<(Range<usize>, Embedding)> = vec![];
    let mut changes = ModelChanges::default();
    for (span, concept) in marks {
        prompt.push_str(&base[at..span.start]);
        let Change { words, .. } = concept.change();
        if words.is_empty() {
            prompt.push_str(&base[span.clone()]);
        }
        for (i, piece) in words.iter().enumerate() {
            if i > 0 {
                prompt.push(' ');
            }
            match piece {
                Words::Text(t) => prompt.push_str(t),
                Words::Vectors { vectors, stand_in } => {
                    let start = prompt.len();
                    prompt.push_str(stand_in);
                    learned.push((
                        start..prompt.len(),
                        Embedding {
                            token: format!("<{}>", concept.name()),
                            vectors: (*vectors).clone(),
                        },
                    ));
                }
            }
        }
        changes.add(sd, *concept, branch)?;
        at = span.end;
    }
    prompt.push_str(&base[at..]);
    let (hooks, text_hooks, unet) = changes.finish(sd, branch, base)?;
    let text_chain = Chain(text_hooks.iter().map(|h| h.as_ref()).collect());
    let text = text_chain.modules();
    let states = if learned.is_empty() && prompt == base && text.is_none() {
        None
    } else {
        let tokens = sd.tokenize(&prompt)?;
        let words: Vec<(Range<usize>, &Embedding)> = learned
            .iter()
            .map(|(span, e)| {
                let p = tokens.positions_of_span(span.clone());
                let r = match (p.first(), p.last()) {
                    (Some(&a), Some(&b)) => a..b + 1,
                    _ => 0..0,
                };
                (r, e)
            })
            .filter(|(r, _)| !r.is_empty())
            .collect();
        Some(text_states_with(sd, &tokens, &words, text)?)
    };
    let uncond = match text {
        Some(text) => Some(text_states_with(
            sd,
            &sd.tokenize(negative)?,
            &[],
            Some(text),
        )?),
        None => None,
    };
    Ok(CustomSide {
        prompt,
        states,
        uncond,
        hooks,
        unet,
    })
}

/// What concepts change in the model: hooks on C's rows, the text encoder's hooks, C's UNet;
/// the hooks of the methods that make theirs together ([`crate::methods::HookMaker::joint`])
/// gathered by method until [`ModelChanges::finish`].
#[derive(Default)]
struct ModelChanges<'c> {
    hooks: Vec<Box<dyn AttentionHook>>,
    text_hooks: Vec<Box<dyn AttentionHook>>,
    unet: Option<std::sync::Arc<UNet>>,
    joint: Vec<(&'static str, Vec<&'c dyn CustomConcept>)>,
}

type Changes = (
    Vec<Box<dyn AttentionHook>>,
    Vec<Box<dyn AttentionHook>>,
    Option<std::sync::Arc<UNet>>,
);

impl<'c> ModelChanges<'c> {
    fn add(
        &mut self,
        sd: &StableDiffusion,
        concept: &'c dyn CustomConcept,
        branch: Branch,
    ) -> Result<()> {
        let change = concept.change();
        if let Some(maker) = change.hooks {
            if maker.joint() {
                match self.joint.iter_mut().find(|(m, _)| *m == concept.method()) {
                    Some((_, peers)) => peers.push(concept),
                    None => self.joint.push((concept.method(), vec![concept])),
                }
            } else {
                self.hooks.push(maker.unet_hook(sd, branch)?);
            }
            self.text_hooks.extend(maker.text_hook(sd)?);
        }
        if let Some(tuned) = change.unet {
            if self.unet.is_some() {
                return Err(Error::arg(
                    "prompt",
                    "two concepts that each bring a UNet (DreamBooth's) in one prompt: C runs one",
                ));
            }
            self.unet = Some(tuned.clone());
        }
        Ok(())
    }

    /// The hooks, text hooks and UNet; the joint hooks made for `prompt` (F's).
    fn finish(mut self, sd: &StableDiffusion, branch: Branch, prompt: &str) -> Result<Changes> {
        for (_, peers) in &self.joint {
            if let Some(maker) = peers[0].change().hooks {
                self.hooks
                    .push(maker.joint_unet_hook(peers, sd, branch, prompt)?);
            }
        }
        Ok((self.hooks, self.text_hooks, self.unet))
    }
}
