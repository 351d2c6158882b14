//! Encode the prompt: text to tokens to the text encoder's states.

use candle_core::Tensor;

use super::{finite, StableDiffusion};
use crate::error::Result;
use crate::sd::tokenizer::Tokens;

impl StableDiffusion {
    /// Tokenizes a prompt for this model's text encoder.
    pub fn tokenize(&self, prompt: &str) -> Result<Tokens> {
        self.tokenizer.encode(prompt)
    }

    /// Text states `(n, tokens, width)` of tokenized prompts, in the working dtype.
    pub fn text_states(&self, tokens: &[&Tokens]) -> Result<Tensor> {
        let ids: Vec<u32> = tokens.iter().flat_map(|t| t.ids.iter().copied()).collect();
        let ids = Tensor::from_vec(ids, (tokens.len(), self.tokenizer.max_len()), &self.device)?;
        let states = self.text_encoder.forward(&ids)?;
        finite(&states, || {
            "the text encoder gave NaN or infinite values (are its weights finite?)".into()
        })?;
        Ok(states)
    }
}
