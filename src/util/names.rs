//! The rules every method's concept names and class words follow.

use crate::error::{Error, Result};

/// Checks a concept name: letters, digits, `_` and `-`, so that `<name>` parses unambiguously.
pub fn check_name(name: &str) -> Result<()> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_alphanumeric() || c == '_' || c == '-')
    {
        return Err(Error::arg(
            "name",
            format!("{name:?}: a concept name is letters, digits, `_` and `-`"),
        ));
    }
    Ok(())
}

/// Checks a class word: not empty (F needs a word in the concept's place).
pub fn check_word(word: &str) -> Result<()> {
    if word.trim().is_empty() {
        return Err(Error::arg(
            "word",
            "the class word is empty: give the kind of thing the concept is (cat, teapot)",
        ));
    }
    Ok(())
}

/// `word` after its indefinite article: "an infusion", "a lora".
pub fn with_article(word: &str) -> String {
    let vowel = word
        .chars()
        .next()
        .is_some_and(|c| "aeiouAEIOU".contains(c));
    format!("{} {word}", if vowel { "an" } else { "a" })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn articles_follow_the_first_sound() {
        assert_eq!(with_article("infusion"), "an infusion");
        assert_eq!(with_article("lora"), "a lora");
        assert_eq!(with_article("textual_inversion"), "a textual_inversion");
    }
}
