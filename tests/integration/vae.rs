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

/// Regression: candle 0.11.1's `Linear` computes wrong rows for a transposed 3-D input with
/// batch > 1 (the VAE attention fed it one); a batch must decode and encode each row as alone.
#[test]
fn batched_rows_equal_single_rows() {
    let r = reference("vae.safetensors");
    let z = get(&r, "decode.latents");
    let zz = candle_core::Tensor::cat(&[z, &(z * 0.5).unwrap()], 0).unwrap();
    let both = tiny().decode(&zz).unwrap();
    let one = tiny().decode(z).unwrap();
    assert_close(
        &both.narrow(0, 0, 1).unwrap(),
        &one,
        1e-6,
        "decode row 0 of 2",
    );
    let img = get(&r, "encode.image");
    let ii = candle_core::Tensor::cat(&[img, &(img * 0.5).unwrap()], 0).unwrap();
    let both = tiny().vae.encode(&ii).unwrap();
    let one = tiny().vae.encode(img).unwrap();
    assert_close(
        &both.mean.narrow(0, 0, 1).unwrap(),
        &one.mean,
        1e-6,
        "encode row 0 of 2",
    );
}
