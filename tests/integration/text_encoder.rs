//! CLIP text encoder parity (reference/text_encoder.safetensors), tolerance 1e-4 relative.

use crate::common::{assert_close, get, ids_tensor, reference, tiny};

#[test]
fn last_hidden_state_matches_reference() {
    let r = reference("text_encoder.safetensors");
    let ids = ids_tensor(get(&r, "ids"));
    let out = tiny().text_encoder.forward(&ids).unwrap();
    assert_close(&out, get(&r, "last_hidden_state"), 1e-4, "text encoder");
}

#[test]
fn tokenizer_and_encoder_agree_with_reference_ids() {
    let r = reference("text_encoder.safetensors");
    let sd = tiny();
    let neg = sd.tokenize("").unwrap();
    let pos = sd.tokenize("a photo of a cat sitting by a teapot").unwrap();
    let states = sd.text_states(&[&neg, &pos]).unwrap();
    assert_close(
        &states,
        get(&r, "last_hidden_state"),
        1e-4,
        "text states from prompts",
    );
}
