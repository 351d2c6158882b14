//! The CLIP BPE tokenizer, built from `vocab.json` + `merges.txt` with the `tokenizers` crate.
//!
//! It reproduces transformers' `CLIPTokenizer` (the `tokenizers`-backed one): NFC, whitespace runs
//! folded to one space, lowercase, CLIP's pre-tokenisation regex, byte-level BPE with a `</w>`
//! end-of-word suffix; then `<|startoftext|>` + at most `max_len - 2` tokens + `<|endoftext|>`,
//! padded to the text encoder's length. Byte offsets are kept, so a word of the prompt can be
//! mapped to its token positions.

use std::ops::Range;
use std::path::{Path, PathBuf};

use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormSeq, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSeq;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::error::{Error, Result};

const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";

/// A prompt, tokenized for the text encoder.
#[derive(Debug, Clone, PartialEq)]
pub struct Tokens {
    /// `max_len` ids: bos, content, eos, padding.
    pub ids: Vec<u32>,
    /// Tokens actually used, bos and eos included (the eos index is `n_tokens - 1`).
    pub n_tokens: usize,
    /// Tokens the prompt would need without truncation, bos and eos included.
    pub untruncated_n_tokens: usize,
    /// The token strings of `ids[..n_tokens]`.
    pub tokens: Vec<String>,
    /// Byte range in the prompt of each of `ids[..n_tokens]` (empty for bos and eos).
    pub offsets: Vec<Range<usize>>,
}

impl Tokens {
    /// True when the prompt was cut to fit the text encoder.
    pub fn truncated(&self) -> bool {
        self.untruncated_n_tokens > self.n_tokens
    }

    /// Positions (indices into `ids`) of the tokens that overlap the byte range `span` of the
    /// prompt: a word split into several BPE tokens gives several positions. Empty when the span
    /// was truncated away.
    pub fn positions_of_span(&self, span: Range<usize>) -> Vec<usize> {
        self.offsets
            .iter()
            .enumerate()
            .filter(|(_, o)| o.start < o.end && o.start < span.end && span.start < o.end)
            .map(|(i, _)| i)
            .collect()
    }

    /// Token positions of every whole-word occurrence of `word` (case-insensitive) in `prompt`,
    /// one entry per occurrence, in order.
    pub fn positions_of_word(&self, prompt: &str, word: &str) -> Vec<Vec<usize>> {
        word_spans(prompt, word)
            .into_iter()
            .map(|span| self.positions_of_span(span))
            .filter(|p| !p.is_empty())
            .collect()
    }
}

/// Byte ranges of the whole-word, case-insensitive occurrences of `word` in `text`.
pub fn word_spans(text: &str, word: &str) -> Vec<Range<usize>> {
    let word = word.trim();
    if word.is_empty() {
        return vec![];
    }
    let lower = text.to_lowercase();
    let needle = word.to_lowercase();
    // Lowercasing can change byte lengths outside ASCII; only trust offsets when it did not.
    if lower.len() != text.len() {
        return exact_word_spans(text, word);
    }
    let is_word_char = |c: char| c.is_alphanumeric();
    let mut spans = vec![];
    let mut start = 0;
    while let Some(i) = lower[start..].find(&needle) {
        let a = start + i;
        let b = a + needle.len();
        let before = lower[..a].chars().next_back().is_some_and(is_word_char);
        let after = lower[b..].chars().next().is_some_and(is_word_char);
        if !before && !after {
            spans.push(a..b);
        }
        start = a + needle.len().max(1);
    }
    spans
}

fn exact_word_spans(text: &str, word: &str) -> Vec<Range<usize>> {
    text.match_indices(word)
        .map(|(a, w)| a..a + w.len())
        .collect()
}

/// The CLIP tokenizer of a model.
#[derive(Clone)]
pub struct ClipTokenizer {
    inner: tokenizers::Tokenizer,
    bos: u32,
    eos: u32,
    pad: u32,
    max_len: usize,
    dir: PathBuf,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("dir", &self.dir)
            .field("max_len", &self.max_len)
            .finish()
    }
}

impl ClipTokenizer {
    /// Builds the tokenizer from `dir/vocab.json` and `dir/merges.txt`, or from the BPE model of
    /// `dir/tokenizer.json` (what transformers 5 saves alone; the same ids either way, as the
    /// rest of the pipeline is CLIP's here); ids are padded or truncated to `max_len` (the text
    /// encoder's `max_position_embeddings`). The pad token is read from `tokenizer_config.json`
    /// when there is one (SD1.x pads with `<|endoftext|>`).
    pub fn from_dir(dir: &Path, max_len: usize) -> Result<Self> {
        let err = |msg: String| Error::Tokenizer {
            path: dir.to_path_buf(),
            msg,
        };
        if max_len < 2 {
            return Err(err(format!(
                "max length {max_len} leaves no room for a token"
            )));
        }
        let bpe = bpe_files(dir)?
            .end_of_word_suffix("</w>".into())
            .unk_token(EOS.into())
            .build()
            .map_err(|e| err(format!("building the BPE model: {e}")))?;
        let normalizer = NormSeq::new(vec![
            NFC.into(),
            Replace::new(
                tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
                " ",
            )
            .map_err(|e| err(e.to_string()))?
            .into(),
            Lowercase.into(),
        ]);
        let split = Split::new(
            SplitPattern::Regex(CLIP_PATTERN.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(|e| err(e.to_string()))?;
        let pre = PreSeq::new(vec![
            split.into(),
            ByteLevel::new(false, true, false).into(),
        ]);
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner
            .with_normalizer(Some(normalizer))
            .map_err(|e| err(e.to_string()))?;
        inner.with_pre_tokenizer(Some(pre));
        inner
            .add_special_tokens([AddedToken::from(BOS, true), AddedToken::from(EOS, true)])
            .map_err(|e| err(e.to_string()))?;

        let id = |tok: &str| {
            inner
                .token_to_id(tok)
                .ok_or_else(|| err(format!("vocab.json has no `{tok}`")))
        };
        let bos = id(BOS)?;
        let eos = id(EOS)?;
        let pad_token = read_pad_token(dir)?.unwrap_or_else(|| EOS.to_string());
        let pad = id(&pad_token)?;
        Ok(Self {
            inner,
            bos,
            eos,
            pad,
            max_len,
            dir: dir.to_path_buf(),
        })
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    /// Tokenizes `prompt`: bos, at most `max_len - 2` tokens, eos, padding.
    pub fn encode(&self, prompt: &str) -> Result<Tokens> {
        let enc = self
            .inner
            .encode(prompt, false)
            .map_err(|e| Error::Tokenizer {
                path: self.dir.clone(),
                msg: format!("cannot tokenize {prompt:?}: {e}"),
            })?;
        let content = self.max_len - 2;
        let n_content = enc.get_ids().len();
        let kept = n_content.min(content);
        let mut ids = Vec::with_capacity(self.max_len);
        let mut tokens = Vec::with_capacity(kept + 2);
        let mut offsets = Vec::with_capacity(kept + 2);
        ids.push(self.bos);
        tokens.push(BOS.to_string());
        offsets.push(0..0);
        for i in 0..kept {
            ids.push(enc.get_ids()[i]);
            tokens.push(enc.get_tokens()[i].clone());
            let (a, b) = enc.get_offsets()[i];
            offsets.push(a..b);
        }
        ids.push(self.eos);
        tokens.push(EOS.to_string());
        offsets.push(0..0);
        let n_tokens = ids.len();
        ids.resize(self.max_len, self.pad);
        Ok(Tokens {
            ids,
            n_tokens,
            untruncated_n_tokens: n_content + 2,
            tokens,
            offsets,
        })
    }

    /// The text of a token id (`</w>` kept), if the vocabulary has it.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of a vocabulary entry (`</w>` part of it), if the vocabulary has it.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

/// The BPE vocabulary and merges of a tokenizer folder: `vocab.json` + `merges.txt`, else the
/// `model` of `tokenizer.json`.
fn bpe_files(dir: &Path) -> Result<tokenizers::models::bpe::BpeBuilder> {
    let vocab = dir.join("vocab.json");
    let merges = dir.join("merges.txt");
    let no_merges = |path: &Path| Error::Tokenizer {
        path: path.to_path_buf(),
        msg: "it holds no merges: every word would split into single characters (a CLIP \
              tokenizer has 48894)"
            .into(),
    };
    if vocab.is_file() && merges.is_file() {
        let text = crate::util::fs::read_regular(&merges)?;
        let any = String::from_utf8_lossy(&text)
            .lines()
            .any(|l| !l.trim().is_empty() && !l.starts_with("#version"));
        if !any {
            return Err(no_merges(&merges));
        }
        return Ok(BPE::from_file(
            &vocab.to_string_lossy(),
            &merges.to_string_lossy(),
        ));
    }
    let json = dir.join("tokenizer.json");
    if !json.is_file() {
        return Err(Error::Tokenizer {
            path: dir.to_path_buf(),
            msg: "no vocab.json + merges.txt and no tokenizer.json".into(),
        });
    }
    let bad = |msg: String| Error::Tokenizer {
        path: json.clone(),
        msg,
    };
    let v: serde_json::Value = crate::sd::config::read_json(&json)?;
    let model = &v["model"];
    if model["type"].as_str() != Some("BPE") {
        return Err(bad(format!("its model is {}, not BPE", model["type"])));
    }
    let vocab: tokenizers::models::bpe::Vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| bad("no model.vocab".into()))?
        .iter()
        .map(|(k, id)| {
            Ok((
                k.clone(),
                id.as_u64().ok_or_else(|| bad(format!("id of {k:?}")))? as u32,
            ))
        })
        .collect::<Result<_>>()?;
    // Merges are "a b" strings (older files) or [a, b] pairs (tokenizers >= 0.20).
    let merges = model["merges"]
        .as_array()
        .ok_or_else(|| bad("no model.merges".into()))?
        .iter()
        .map(|m| match m {
            serde_json::Value::String(s) => s
                .split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string())),
            serde_json::Value::Array(p) => match (p.first(), p.get(1)) {
                (Some(a), Some(b)) => Some((a.as_str()?.to_string(), b.as_str()?.to_string())),
                _ => None,
            },
            _ => None,
        })
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| bad("a merge is neither \"a b\" nor [a, b]".into()))?;
    if merges.is_empty() {
        return Err(no_merges(&json));
    }
    Ok(BPE::builder().vocab_and_merges(vocab, merges))
}

fn read_pad_token(dir: &Path) -> Result<Option<String>> {
    let path = dir.join("tokenizer_config.json");
    if !path.is_file() {
        return Ok(None);
    }
    let v: serde_json::Value = crate::sd::config::read_json(&path)?;
    Ok(match v.get("pad_token") {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(obj) => obj
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        None => None,
    })
}
