//! Tokenizer parity with transformers' CLIPTokenizer (reference/tokens.json): exact ids for every
//! prompt, token counts, truncation, and the word -> position map.

use crate::common::{repo, tiny};

#[derive(serde::Deserialize)]
struct Case {
    prompt: String,
    ids: Vec<u32>,
    n_tokens: usize,
    truncated: bool,
    untruncated_n_tokens: usize,
    tokens: Vec<String>,
}

fn cases() -> Vec<Case> {
    let path = repo().join("tests/fixtures/reference/tokens.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn ids_match_reference_for_every_prompt() {
    let tok = &tiny().tokenizer;
    let cases = cases();
    assert!(cases.len() >= 20);
    for c in &cases {
        let t = tok.encode(&c.prompt).unwrap();
        assert_eq!(t.ids, c.ids, "ids of {:?}", c.prompt);
        assert_eq!(t.n_tokens, c.n_tokens, "n_tokens of {:?}", c.prompt);
        assert_eq!(t.truncated(), c.truncated, "truncated of {:?}", c.prompt);
        assert_eq!(
            t.untruncated_n_tokens, c.untruncated_n_tokens,
            "untruncated_n_tokens of {:?}",
            c.prompt
        );
        assert_eq!(t.tokens, c.tokens, "tokens of {:?}", c.prompt);
    }
}

#[test]
fn reference_has_a_truncated_prompt_and_it_is_reported() {
    let tok = &tiny().tokenizer;
    let long = cases()
        .into_iter()
        .find(|c| c.truncated)
        .expect("a truncated case");
    let t = tok.encode(&long.prompt).unwrap();
    assert!(t.truncated());
    assert_eq!(t.n_tokens, tok.max_len());
    assert!(t.untruncated_n_tokens > tok.max_len());
}

#[test]
fn word_positions_cover_all_bpe_pieces() {
    let tok = &tiny().tokenizer;
    let prompt = "a photo of a cat sitting by a teapot";
    let t = tok.encode(prompt).unwrap();
    // The fixtures put "cat" at 5 and "teapot" at 9 (position 0 = bos).
    assert_eq!(t.positions_of_word(prompt, "cat"), vec![vec![5]]);
    assert_eq!(t.positions_of_word(prompt, "teapot"), vec![vec![9]]);
    // "teddybear" is two BPE tokens: both positions belong to the word.
    let t = tok.encode("a teddybear and a cat").unwrap();
    assert_eq!(t.tokens[2], "teddy");
    assert_eq!(
        t.positions_of_word("a teddybear and a cat", "teddybear"),
        vec![vec![2, 3]]
    );
    // Whole words only, case-insensitive, every occurrence.
    let p = "Cat and catalog, a CAT";
    let t = tok.encode(p).unwrap();
    let occ = t.positions_of_word(p, "cat");
    assert_eq!(occ.len(), 2, "{:?}", t.tokens);
    for o in &occ {
        assert_eq!(t.tokens[o[0]], "cat</w>");
    }
}

#[test]
fn word_truncated_away_has_no_positions() {
    let tok = &tiny().tokenizer;
    let prompt = format!("{} zebra", "a ".repeat(100));
    let t = tok.encode(&prompt).unwrap();
    assert!(t.truncated());
    assert!(t.positions_of_word(&prompt, "zebra").is_empty());
}
