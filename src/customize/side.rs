//! C's side of a prompt with other methods' concepts: its text (a learned word's vectors, a
//! trigger word, a text-encoder LoRA), its hooks (a LoRA's) and its UNet (DreamBooth's). F
//! always sees the plain model with the class word.

use std::ops::Range;

use candle_core::Tensor;

use crate::error::Result;
use crate::methods::adapted::{Adapted, Change};
use crate::methods::files::Embedding;
use crate::methods::lora::LoraHook;
use crate::methods::textual_inversion::text_states_with;
use crate::sd::hook::{AttentionHook, Branch, Chain};
use crate::sd::pipeline::StableDiffusion;

/// C's side of a prompt: its text (when it differs from F's), its hooks, and its UNet (when a
/// DreamBooth concept gives one).
pub struct CustomSide {
    /// C's prompt (F's base prompt with each concept's words).
    pub prompt: String,
    /// C's conditional text states `(1, tokens, width)`, when they differ from F's.
    pub states: Option<Tensor>,
    /// C's unconditional text states (of the negative prompt), when they differ from F's: a
    /// LoRA of the text encoder changes them too, as diffusers' pipeline encodes both with it.
    pub uncond: Option<Tensor>,
    pub hooks: Vec<Box<dyn AttentionHook>>,
    pub unet: Option<std::sync::Arc<crate::sd::unet::UNet>>,
}

/// C's side for the base prompt `base` (the class words in place) and the negative prompt
/// `negative` with `marks`: each concept at its word's byte span of `base`, in order. Hooks
/// change the rows of `branch`.
pub fn custom_side(
    sd: &StableDiffusion,
    base: &str,
    negative: &str,
    marks: &[(Range<usize>, &Adapted)],
    branch: Branch,
) -> Result<CustomSide> {
    let mut prompt = String::with_capacity(base.len());
    let mut at = 0;
    let mut learned = vec![];
    let mut hooks: Vec<Box<dyn AttentionHook>> = vec![];
    let mut text_loras: Vec<LoraHook> = vec![];
    let mut unet: Option<std::sync::Arc<crate::sd::unet::UNet>> = None;
    for (span, a) in marks {
        prompt.push_str(&base[at..span.start]);
        let start = prompt.len();
        prompt.push_str(&a.c_words());
        match &a.change {
            Change::TextualInversion(e) => learned.push((start..prompt.len(), e)),
            Change::Lora { lora, scale, .. } => {
                let hook = LoraHook::new(lora, sd, *scale, Some(branch))?;
                if hook.changes_text() {
                    text_loras.push(LoraHook::new(lora, sd, *scale, None)?);
                }
                hooks.push(Box::new(hook));
            }
            Change::DreamBooth { unet: tuned, .. } => {
                if unet.is_some() {
                    return Err(crate::error::Error::arg(
                        "prompt",
                        "two DreamBooth concepts in one prompt: C runs one UNet",
                    ));
                }
                unet = Some(tuned.unet.clone());
            }
        }
        at = span.end;
    }
    prompt.push_str(&base[at..]);
    let text_hooks = Chain(text_loras.iter().map(|h| h as &dyn AttentionHook).collect());
    let text = text_hooks.modules();
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
                (r, *e)
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
