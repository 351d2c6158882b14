//! VAE parity (reference/vae.safetensors): decode, and encode's mean and std, tolerance 1e-4
//! relative.

use crate::common::{assert_close, get, reference, tiny};

#[test]
fn decode_matches_reference() {
    let r = reference("vae.safetensors");
    let image = tiny().decode(get(&r, "decode.latents")).unwrap();
    assert_close(&image, get(&r, "decode.image"), 1e-4, "VAE decode");
}

#[test]
fn encode_matches_reference() {
    let r = reference("vae.safetensors");
    let dist = tiny().vae.encode(get(&r, "encode.image")).unwrap();
    assert_close(&dist.mean, get(&r, "encode.mean"), 1e-4, "VAE encode mean");
    assert_close(&dist.std, get(&r, "encode.std"), 1e-4, "VAE encode std");
}
