//! Prompts with concepts: `"a <mycat> reading next to a <pot>"`.
//!
//! `<name>` (letters, digits, `_`, `-`) marks where a loaded concept goes. The foundational
//! pipeline sees the prompt with each mark replaced by the concept's class word ("a cat reading
//! next to a teapot"); the customized pipeline adds the concept's Δ at every token position of
//! that word. A `<` that does not start such a mark is ordinary text.
//!
//! A mark stands apart as a word: no letter or digit, and no other mark, right before or after
//! it. `<pot>s` would become "teapots", which tokenizes differently from "teapot", and
//! `<mycat><pot>` would put both residuals on the nonsense tokens of "catteapot"; both are
//! refused with the prompt and a caret under the spot. Punctuation may touch a mark
//! (`<pot>'s`, `(<pot>)`, `<pot>-shaped`).

use std::collections::BTreeMap;
use std::ops::Range;

use candle_core::Tensor;

use super::set::ConceptSet;
use crate::error::{Error, Result};
use crate::methods::ConceptRef;
use crate::sd::tokenizer::Tokens;

/// One `<name>` of a prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConceptMark {
    pub name: String,
    /// Byte range of the class word in [`ParsedPrompt::base`].
    pub span: Range<usize>,
}

/// A prompt split into what F sees and where the concepts go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedPrompt {
    /// The prompt with every `<name>` replaced by its class word.
    pub base: String,
    pub marks: Vec<ConceptMark>,
}

impl ParsedPrompt {
    pub fn has_concepts(&self) -> bool {
        !self.marks.is_empty()
    }
}

fn is_name_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_' || c == '-'
}

/// A prompt error with the prompt and a caret under byte `at`.
fn prompt_error(prompt: &str, at: usize, msg: &str) -> Error {
    let col = prompt[..at].chars().count();
    Error::arg(
        "prompt",
        format!("{msg}:\n  {prompt}\n  {}^", " ".repeat(col)),
    )
}

/// Checks that the mark at bytes `start..end` of `prompt` (from `<` to `>`) stands apart.
fn check_apart(prompt: &str, start: usize, end: usize) -> Result<()> {
    let touches = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '<' || c == '>');
    let msg = "a concept mark must stand apart from the letters and marks around it \
               (write \"<mycat> <pot>\", \"<pot> pots\")";
    if touches(prompt[..start].chars().next_back()) {
        return Err(prompt_error(prompt, start, msg));
    }
    if touches(prompt[end..].chars().next()) {
        return Err(prompt_error(prompt, end, msg));
    }
    Ok(())
}

/// Finds the `<name>` marks of `prompt` and replaces each by `word_of(name)`. An unknown name is
/// an error that names it; a mark that does not stand apart is an error that shows where.
pub fn parse_prompt(
    prompt: &str,
    word_of: impl Fn(&str) -> Option<String>,
) -> Result<ParsedPrompt> {
    let mut base = String::with_capacity(prompt.len());
    let mut marks = vec![];
    let mut rest = prompt;
    while let Some(i) = rest.find('<') {
        base.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let name_len = after
            .char_indices()
            .find(|&(_, c)| !is_name_char(c))
            .map(|(j, _)| j)
            .unwrap_or(after.len());
        if name_len > 0 && after[name_len..].starts_with('>') {
            let start = prompt.len() - rest.len() + i;
            check_apart(prompt, start, start + name_len + 2)?;
            let name = &after[..name_len];
            let word = word_of(name).ok_or_else(|| {
                Error::arg("prompt", format!("no concept named <{name}> is loaded"))
            })?;
            let start = base.len();
            base.push_str(&word);
            marks.push(ConceptMark {
                name: name.to_string(),
                span: start..base.len(),
            });
            rest = &after[name_len + 1..];
        } else {
            base.push('<');
            rest = after;
        }
    }
    base.push_str(rest);
    Ok(ParsedPrompt { base, marks })
}

/// A concept with Infusion's residuals placed in a prompt: the concept and the token positions
/// of its word.
#[derive(Debug, Clone)]
pub struct Placement {
    pub concept: ConceptRef,
    pub positions: Vec<usize>,
}

impl Placement {
    /// Its Δ per cross-attention layer (every placed concept has them).
    pub fn deltas(&self) -> Option<&BTreeMap<String, Tensor>> {
        self.concept.change().residuals
    }
}

/// Resolves the marks of `parsed` that name concepts with Infusion's residuals to token
/// positions in `tokens` (the tokenized base prompt); the other concepts' marks are left to
/// [`super::side`].
pub fn place_concepts(
    concepts: &ConceptSet,
    parsed: &ParsedPrompt,
    tokens: &Tokens,
) -> Result<Vec<Placement>> {
    let mut out = vec![];
    for m in &parsed.marks {
        let concept = concepts.get(&m.name).ok_or_else(|| {
            Error::arg("prompt", format!("no concept named <{}> is loaded", m.name))
        })?;
        if concept.change().residuals.is_none() {
            continue;
        }
        let positions = tokens.positions_of_span(m.span.clone());
        if positions.is_empty() {
            return Err(Error::arg(
                "prompt",
                format!(
                    "the word of <{}> was cut off: the prompt has {} tokens, the text encoder \
                     takes {}",
                    m.name,
                    tokens.untruncated_n_tokens,
                    tokens.ids.len()
                ),
            ));
        }
        out.push(Placement {
            concept: concept.clone(),
            positions,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(name: &str) -> Option<String> {
        match name {
            "mycat" => Some("cat".into()),
            "pot" => Some("teapot".into()),
            "bear-2" => Some("teddy bear".into()),
            _ => None,
        }
    }

    #[test]
    fn marks_become_class_words_with_spans() {
        let p = parse_prompt("a <mycat> reading next to a <pot>", words).unwrap();
        assert_eq!(p.base, "a cat reading next to a teapot");
        assert_eq!(p.marks.len(), 2);
        assert_eq!(&p.base[p.marks[0].span.clone()], "cat");
        assert_eq!(&p.base[p.marks[1].span.clone()], "teapot");
        let p = parse_prompt("<bear-2>, (<mycat>) <pot>'s lid, <pot>-shaped!", words).unwrap();
        assert_eq!(p.base, "teddy bear, (cat) teapot's lid, teapot-shaped!");
        assert_eq!(&p.base[p.marks[0].span.clone()], "teddy bear");
        assert_eq!(p.marks.len(), 4);
    }

    #[test]
    fn marks_touching_letters_or_marks_are_refused_with_a_caret() {
        let e = parse_prompt("a <mycat><pot> on a mat", words)
            .unwrap_err()
            .to_string();
        assert!(e.contains("stand apart"), "{e}");
        assert!(
            e.ends_with("  a <mycat><pot> on a mat\n           ^"),
            "{e}"
        );
        let e = parse_prompt("two <pot>s", words).unwrap_err().to_string();
        assert!(e.ends_with("  two <pot>s\n           ^"), "{e}");
        let e = parse_prompt("é<pot>", words).unwrap_err().to_string();
        assert!(e.ends_with("  é<pot>\n   ^"), "{e}");
    }

    #[test]
    fn other_angle_brackets_are_text() {
        let p = parse_prompt("a < b, x<>y, <not closed, <a b>", words).unwrap();
        assert_eq!(p.base, "a < b, x<>y, <not closed, <a b>");
        assert!(!p.has_concepts());
    }

    #[test]
    fn unknown_names_are_errors_naming_them() {
        let e = parse_prompt("a <dog> and a <mycat>", words).unwrap_err();
        assert!(e.to_string().contains("<dog>"), "{e}");
    }
}
