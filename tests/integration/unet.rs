//! UNet parity (reference/unet.safetensors): one call with per-element timesteps, tolerance 1e-4
//! relative; and the same result from a scalar timestep per row.

use candle_core::{DType, Tensor};

use crate::common::{assert_close, get, reference, tiny};

#[test]
fn eps_matches_reference_with_per_element_timesteps() {
    let r = reference("unet.safetensors");
    let t = get(&r, "timesteps").to_dtype(DType::F32).unwrap();
    let eps = tiny()
        .unet
        .forward(
            get(&r, "sample"),
            &t,
            get(&r, "encoder_hidden_states"),
            None,
        )
        .unwrap();
    assert_close(&eps, get(&r, "eps"), 1e-4, "UNet eps");
}

#[test]
fn scalar_timestep_per_row_matches_reference() {
    let r = reference("unet.safetensors");
    let ts = get(&r, "timesteps").to_vec1::<i64>().unwrap();
    let sample = get(&r, "sample");
    let ctx = get(&r, "encoder_hidden_states");
    let eps = get(&r, "eps");
    for (i, &t) in ts.iter().enumerate() {
        let out = tiny()
            .unet
            .forward(
                &sample.narrow(0, i, 1).unwrap(),
                &Tensor::new(t as f32, sample.device()).unwrap(),
                &ctx.narrow(0, i, 1).unwrap(),
                None,
            )
            .unwrap();
        assert_close(
            &out,
            &eps.narrow(0, i, 1).unwrap(),
            1e-4,
            &format!("UNet row {i}"),
        );
    }
}

#[test]
fn attention_layers_are_named_by_weight_path() {
    let layers = tiny().unet.attention_layers();
    let cross: Vec<_> = layers
        .iter()
        .filter(|l| l.kind == infusion_repl::AttnKind::CrossAttention)
        .map(|l| (l.path.as_str(), l.heads, l.head_dim))
        .collect();
    // The table in tests/fixtures/README.md, in the order the UNet runs them.
    assert_eq!(
        cross,
        vec![
            (
                "down_blocks.0.attentions.0.transformer_blocks.0.attn2",
                2,
                16
            ),
            (
                "down_blocks.0.attentions.1.transformer_blocks.0.attn2",
                2,
                16
            ),
            ("mid_block.attentions.0.transformer_blocks.0.attn2", 2, 32),
            ("up_blocks.1.attentions.0.transformer_blocks.0.attn2", 2, 16),
            ("up_blocks.1.attentions.1.transformer_blocks.0.attn2", 2, 16),
            ("up_blocks.1.attentions.2.transformer_blocks.0.attn2", 2, 16),
        ]
    );
    assert_eq!(layers.len(), 2 * cross.len());
}
