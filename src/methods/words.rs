//! Learned word embeddings in a prompt, for every method that learns one (Textual Inversion's
//! word, and any method that trains a token's vectors): the prompt is tokenized with a stand-in
//! text where the learned word goes, the stand-in's tokens are replaced by as many slots as the
//! embedding has vectors, and those slots' token embeddings are the learned vectors. For a
//! one-token stand-in and a one-vector embedding this is exactly what diffusers computes after
//! `load_textual_inversion` for a prompt holding the new token there.

use std::ops::Range;

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::sd::hook::ModuleHook;
use crate::sd::pipeline::StableDiffusion;
use crate::sd::tokenizer::Tokens;

/// A learned word: `vectors` (n, width) stand for one new word.
#[derive(Debug, Clone)]
pub struct Embedding {
    /// The token the file names (diffusers' key; A1111's files are named after the file).
    pub token: String,
    pub vectors: Tensor,
}

/// `ids` with the tokens at `span` replaced by `n` slots (holding the span's first id until their
/// embeddings are set), kept at the same length: padding gives way or is added (the last id is
/// the padding), and a prompt that no longer fits is cut and still ends with `eos`. Returns the
/// ids and the slots' range.
pub fn with_slots(ids: &[u32], span: Range<usize>, n: usize, eos: u32) -> (Vec<u32>, Range<usize>) {
    let len = ids.len();
    let fill = ids.get(span.start).copied().unwrap_or(eos);
    let mut out: Vec<u32> = ids[..span.start].to_vec();
    out.extend(std::iter::repeat_n(fill, n));
    out.extend(&ids[span.end.min(len)..]);
    let pad = ids.last().copied().unwrap_or(eos);
    if out.len() < len {
        out.resize(len, pad);
    } else if out.len() > len {
        // Drop padding after the end of text first; if the text itself no longer fits, cut it
        // and end it with eos.
        let eos_at = out[span.start + n..]
            .iter()
            .position(|&t| t == eos)
            .map(|i| i + span.start + n);
        out.truncate(len);
        if eos_at.is_none_or(|i| i >= len) {
            out[len - 1] = eos;
        }
    }
    let end = (span.start + n).min(len - 1);
    (out, span.start.min(end)..end)
}

/// The text states `(1, tokens, width)` of `tokens` (a prompt tokenized with the class word)
/// with the word's tokens at `span` replaced by the embedding's vectors.
pub fn text_states(
    sd: &StableDiffusion,
    tokens: &Tokens,
    span: Range<usize>,
    embedding: &Embedding,
) -> Result<Tensor> {
    text_states_with(sd, tokens, &[(span, embedding)], None)
}

/// C's text states of a training batch's prompts `(b, tokens, width)`, with the learned word `e`
/// in the place of each prompt's words (the tokens its templates' `{}` became).
pub fn batch_states(
    sd: &StableDiffusion,
    data: &crate::train::TrainingSet,
    batch: &crate::train::Batch,
    e: &Embedding,
) -> Result<Tensor> {
    let states = data
        .prompt_tokens(batch)
        .into_iter()
        .map(|(tokens, pos)| text_states(sd, tokens, pos[0]..pos[pos.len() - 1] + 1, e))
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&states, 0)?)
}

/// As [`text_states`] with several learned words, each at its token span (spans apart), and
/// `hook` changing the text encoder's modules (a LoRA's).
pub fn text_states_with(
    sd: &StableDiffusion,
    tokens: &Tokens,
    words: &[(Range<usize>, &Embedding)],
    hook: Option<&dyn ModuleHook>,
) -> Result<Tensor> {
    let te = &sd.text_encoder;
    // Room for the learned words between the start and end tokens.
    let room = tokens.ids.len().saturating_sub(2);
    for (_, e) in words {
        let n = e.vectors.dims2()?.0;
        if n == 0 || n > room {
            return Err(Error::arg(
                "embedding",
                format!(
                    "`{}` holds {n} vectors: a learned word takes 1 to {room} (a prompt's room \
                     for tokens)",
                    e.token
                ),
            ));
        }
        let width = e.vectors.dims2()?.1;
        if width != te.hidden_size() {
            return Err(Error::arg(
                "embedding",
                format!(
                    "`{}` has vectors of width {width}, this model's text encoder takes {}",
                    e.token,
                    te.hidden_size()
                ),
            ));
        }
    }
    // From the last word back, so that the spans before stay where they are.
    let mut words: Vec<&(Range<usize>, &Embedding)> = words.iter().collect();
    words.sort_by_key(|(span, _)| std::cmp::Reverse(span.start));
    let mut ids = tokens.ids.clone();
    let mut placed = vec![];
    for (span, e) in words {
        let n = e.vectors.dim(0)?;
        let (next, slots) = with_slots(&ids, span.clone(), n, sd.tokenizer.eos_id());
        let shift = slots.len() as isize - span.len() as isize;
        for (s, _) in &mut placed {
            let s: &mut Range<usize> = s;
            let at = |i: usize| (i as isize + shift).clamp(0, ids.len() as isize - 1) as usize;
            *s = at(s.start)..at(s.end);
        }
        placed.push((slots, *e));
        ids = next;
    }
    let len = ids.len();
    let mut embeds = te.embed_tokens(&Tensor::from_vec(ids, (1, len), sd.device())?)?;
    for (slots, e) in placed.into_iter().filter(|(s, _)| !s.is_empty()) {
        let vectors = e
            .vectors
            .narrow(0, 0, slots.len())?
            .to_device(sd.device())?
            .to_dtype(embeds.dtype())?
            .unsqueeze(0)?;
        embeds = Tensor::cat(
            &[
                embeds.narrow(1, 0, slots.start)?,
                vectors,
                embeds.narrow(1, slots.end, len - slots.end)?,
            ],
            1,
        )?;
    }
    Ok(te.forward_embeds_with(&embeds, hook)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EOS: u32 = 9;

    #[test]
    fn slots_replace_the_word_and_padding_gives_way() {
        // bos a cat sat eos pad pad
        let ids = [0, 1, 2, 3, EOS, EOS, EOS];
        assert_eq!(with_slots(&ids, 2..3, 1, EOS), (ids.to_vec(), 2..3));
        assert_eq!(
            with_slots(&ids, 2..3, 3, EOS),
            (vec![0, 1, 2, 2, 2, 3, EOS], 2..5)
        );
        // A two-token word, one vector: the sequence closes up and is padded.
        assert_eq!(
            with_slots(&ids, 1..3, 1, EOS),
            (vec![0, 1, 3, EOS, EOS, EOS, EOS], 1..2)
        );
        // No room: the text is cut and still ends with eos.
        let full = [0, 1, 2, 3, 4, EOS];
        assert_eq!(
            with_slots(&full, 2..3, 2, EOS),
            (vec![0, 1, 2, 2, 3, EOS], 2..4)
        );
    }
}
