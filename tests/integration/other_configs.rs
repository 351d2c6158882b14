//! Nothing is tuned to the fixture's config: other tiny SD1.x configs (other widths, block counts,
//! head lists, linear projections, deeper transformers, a shorter text encoder, another VAE
//! scale factor) are built with random weights, written in diffusers layout, loaded through the
//! same loader and checked for what must hold on any config.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use infusion_repl::sd::Kernels;
use infusion_repl::sd::TextEncoder;
use infusion_repl::sd::UNet;
use infusion_repl::sd::Vae;
use infusion_repl::sd::{Denoise, Trajectory};
use infusion_repl::sd::{TextEncoderConfig, UNetConfig, VaeConfig};
use infusion_repl::{
    AttentionCall, AttentionHook, AttnKind, AttnSite, BatchLayout, Branch, GenerateOptions,
    Guidance, HookCtx, Job, LayerInfo, LoadOptions, StableDiffusion,
};
use serde_json::{json, Value};

use crate::common::{max_abs, tiny_model_dir};

/// The rows of the plain (F) and the changed (C) branch, as Infusion tags them.
const F: Branch = Branch(0);
const C: Branch = Branch(1);

/// Writes `config` and random weights for the component built by `build` into `dir`.
fn write_component<M>(
    dir: &Path,
    weights_name: &str,
    config: &Value,
    seed: u64,
    build: impl Fn(VarBuilder) -> candle_core::Result<M>,
) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let varmap = VarMap::new();
    build(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu)).unwrap();
    // Perturb every parameter so no norm weight is exactly one and no bias exactly zero.
    let mut names: Vec<_> = varmap.data().lock().unwrap().keys().cloned().collect();
    names.sort();
    for (i, name) in names.iter().enumerate() {
        let data = varmap.data().lock().unwrap();
        let var = &data[name];
        let noise =
            infusion_repl::util::seeded_noise(seed * 10_000 + i as u64, var.dims()).unwrap();
        var.set(&(var.as_tensor() + (noise * 0.05).unwrap()).unwrap())
            .unwrap();
    }
    varmap.save(dir.join(weights_name)).unwrap();
}

/// A complete model folder in diffusers layout with random weights.
fn write_model(root: &Path, text: Value, unet: Value, vae: Value) {
    let copy = |sub: &str| {
        let from = tiny_model_dir().join(sub);
        std::fs::create_dir_all(root.join(sub)).unwrap();
        for e in std::fs::read_dir(&from).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), root.join(sub).join(e.file_name())).unwrap();
        }
    };
    copy("tokenizer");
    copy("scheduler");
    std::fs::copy(
        tiny_model_dir().join("model_index.json"),
        root.join("model_index.json"),
    )
    .unwrap();
    let tcfg: TextEncoderConfig = serde_json::from_value(text.clone()).unwrap();
    let ucfg: UNetConfig = serde_json::from_value(unet.clone()).unwrap();
    let vcfg: VaeConfig = serde_json::from_value(vae.clone()).unwrap();
    write_component(
        &root.join("text_encoder"),
        "model.safetensors",
        &text,
        1,
        |vb| TextEncoder::new(vb, &tcfg),
    );
    write_component(
        &root.join("unet"),
        "diffusion_pytorch_model.safetensors",
        &unet,
        2,
        |vb| UNet::new(vb, &ucfg, Kernels::Naive),
    );
    write_component(
        &root.join("vae"),
        "diffusion_pytorch_model.safetensors",
        &vae,
        3,
        |vb| Vae::new(vb, &vcfg, Kernels::Naive),
    );
}

fn text_config(hidden: usize, heads: usize, layers: usize, positions: usize) -> Value {
    json!({
        "vocab_size": 49408, "hidden_size": hidden, "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers, "num_attention_heads": heads,
        "max_position_embeddings": positions, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5
    })
}

struct Case {
    name: &'static str,
    text: Value,
    unet: Value,
    vae: Value,
    /// (path, heads, head_dim) of every cross-attention layer, in run order.
    cross_layers: Vec<(String, usize, usize)>,
    text_len: usize,
    latent: (usize, usize),
    scale_factor: usize,
}

fn cases() -> Vec<Case> {
    let attn2 = |block: &str, i: usize, j: usize, t: usize| {
        format!("{block}.{i}.attentions.{j}.transformer_blocks.{t}.attn2")
    };
    vec![
        // Three blocks, a per-block head list, one layer per block, a 3-block VAE (scale 4),
        // a 24-wide text encoder with 32 positions.
        Case {
            name: "three blocks, head list",
            text: text_config(24, 3, 1, 32),
            unet: json!({
                "in_channels": 4, "out_channels": 4, "block_out_channels": [16, 32, 48],
                "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
                "layers_per_block": 1, "attention_head_dim": [1, 2, 4], "cross_attention_dim": 24,
                "norm_num_groups": 4, "sample_size": 8
            }),
            vae: json!({
                "block_out_channels": [8, 16, 16], "layers_per_block": 1, "latent_channels": 4,
                "norm_num_groups": 4, "scaling_factor": 0.3
            }),
            cross_layers: vec![
                (attn2("down_blocks", 0, 0, 0), 1, 16),
                (attn2("down_blocks", 1, 0, 0), 2, 16),
                (
                    "mid_block.attentions.0.transformer_blocks.0.attn2".into(),
                    4,
                    12,
                ),
                (attn2("up_blocks", 1, 0, 0), 2, 16),
                (attn2("up_blocks", 1, 1, 0), 2, 16),
                (attn2("up_blocks", 2, 0, 0), 1, 16),
                (attn2("up_blocks", 2, 1, 0), 1, 16),
            ],
            text_len: 32,
            latent: (8, 8),
            scale_factor: 4,
        },
        // Linear projections, two transformer layers per block, explicit num_attention_heads,
        // no quant convs, VAE attention off, a non-square image.
        Case {
            name: "linear projection, deep transformers",
            text: text_config(16, 2, 2, 77),
            unet: json!({
                "in_channels": 4, "out_channels": 4, "block_out_channels": [8, 16],
                "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
                "layers_per_block": 2, "attention_head_dim": 4, "num_attention_heads": [2, 4],
                "cross_attention_dim": 16, "transformer_layers_per_block": 2,
                "use_linear_projection": true, "norm_num_groups": 4, "sample_size": 8
            }),
            vae: json!({
                "block_out_channels": [8, 8], "layers_per_block": 2, "latent_channels": 4,
                "norm_num_groups": 4, "use_quant_conv": false, "use_post_quant_conv": false,
                "mid_block_add_attention": false
            }),
            cross_layers: vec![
                (attn2("down_blocks", 0, 0, 0), 2, 4),
                (attn2("down_blocks", 0, 0, 1), 2, 4),
                (attn2("down_blocks", 0, 1, 0), 2, 4),
                (attn2("down_blocks", 0, 1, 1), 2, 4),
                (
                    "mid_block.attentions.0.transformer_blocks.0.attn2".into(),
                    4,
                    4,
                ),
                (
                    "mid_block.attentions.0.transformer_blocks.1.attn2".into(),
                    4,
                    4,
                ),
                (attn2("up_blocks", 1, 0, 0), 2, 4),
                (attn2("up_blocks", 1, 0, 1), 2, 4),
                (attn2("up_blocks", 1, 1, 0), 2, 4),
                (attn2("up_blocks", 1, 1, 1), 2, 4),
                (attn2("up_blocks", 1, 2, 0), 2, 4),
                (attn2("up_blocks", 1, 2, 1), 2, 4),
            ],
            text_len: 77,
            latent: (6, 10),
            scale_factor: 2,
        },
    ]
}

/// The Infusion-style hook of the attention tests with zero deltas: cond_C reuses cond_F's
/// probabilities and gets its values back unchanged (plus zero).
struct ShareOnly;

impl AttentionHook for ShareOnly {
    fn wants(&self, layer: &LayerInfo) -> bool {
        layer.kind == AttnKind::CrossAttention
    }
    fn attend(&self, site: &AttnSite<'_>, call: &mut AttentionCall) -> candle_core::Result<()> {
        let find = |branch| {
            site.rows
                .find(branch, Guidance::Conditional, 0)
                .ok_or_else(|| candle_core::Error::Msg(format!("no {branch:?} row")))
        };
        call.share_probs(find(C)?, find(F)?)?;
        let v = call.values().clone();
        call.set_values((&v + v.zeros_like()?)?)
    }
}

fn check_case(case: &Case) {
    let dir = tempfile::tempdir().unwrap();
    write_model(
        dir.path(),
        case.text.clone(),
        case.unet.clone(),
        case.vae.clone(),
    );
    let sd = StableDiffusion::load_dir(dir.path(), &LoadOptions::default())
        .unwrap_or_else(|e| panic!("{}: {e}", case.name));
    let name = case.name;

    // Sizes come from the configs.
    assert_eq!(sd.tokenizer.max_len(), case.text_len, "{name}");
    assert_eq!(sd.vae_scale_factor(), case.scale_factor, "{name}");
    let cross: Vec<(String, usize, usize)> = sd
        .unet
        .attention_layers()
        .into_iter()
        .filter(|l| l.kind == AttnKind::CrossAttention)
        .map(|l| (l.path.clone(), l.heads, l.head_dim))
        .collect();
    assert_eq!(cross, case.cross_layers, "{name}");

    // A generation at a non-native size has the requested shape and finite values.
    let (h, w) = case.latent;
    let f = case.scale_factor;
    let opts = GenerateOptions {
        steps: 3,
        width: Some(w * f),
        height: Some(h * f),
        ..Default::default()
    };
    let g = sd
        .generate("a photo of a cat", &opts, &Job::quiet())
        .unwrap();
    assert_eq!(g.latents.dims(), [1, 4, h, w], "{name}");
    assert_eq!(g.image.dims(), [1, 3, h * f, w * f], "{name}");
    assert!(max_abs(&g.image).is_finite(), "{name}");

    // Per-element timesteps give what separate calls give.
    let x = infusion_repl::util::seeded_noise(5, &[2, 4, h, w]).unwrap();
    let tokens = sd.tokenize("a teapot").unwrap();
    let neg = sd.tokenize("").unwrap();
    let ctx = sd.text_states(&[&neg, &tokens]).unwrap();
    let ts = Tensor::new(&[901f32, 11.0], &Device::Cpu).unwrap();
    let both = sd.unet.forward(&x, &ts, &ctx, None).unwrap();
    for i in 0..2 {
        let one = sd
            .unet
            .forward(
                &x.narrow(0, i, 1).unwrap(),
                &ts.narrow(0, i, 1).unwrap(),
                &ctx.narrow(0, i, 1).unwrap(),
                None,
            )
            .unwrap();
        let err = max_abs(&(one - both.narrow(0, i, 1).unwrap()).unwrap());
        assert!(err <= 1e-5, "{name}: per-element timesteps, row {i}: {err}");
    }

    // A hook that reuses F's probabilities for C and adds zero leaves C equal to F, bit for bit.
    let traj = |branch| Trajectory {
        branch,
        sample: 0,
        uncond: ctx.get(0).unwrap().unsqueeze(0).unwrap(),
        cond: ctx.get(1).unwrap().unsqueeze(0).unwrap(),
    };
    let init = infusion_repl::util::seeded_noise(9, &[1, 4, h, w]).unwrap();
    let out = sd
        .denoise(
            &Denoise::new(
                &init,
                &[traj(F), traj(C)],
                &GenerateOptions {
                    steps: 3,
                    ..Default::default()
                },
            )
            .hook(Some(&ShareOnly)),
            &Job::quiet(),
            &mut |_| Ok(()),
        )
        .unwrap();
    assert_eq!(max_abs(&(&out[0] - &out[1]).unwrap()), 0.0, "{name}");

    // The same layout check as on the fixture model.
    let rows = BatchLayout::cfg(F);
    let hook = HookCtx {
        hook: &ShareOnly,
        rows: &rows,
        step: None,
    };
    let e = sd
        .unet
        .forward(&x, &ts, &ctx, Some(&hook))
        .expect_err("no C rows");
    assert!(e.to_string().contains("no Branch(1) row"), "{name}: {e}");
}

#[test]
fn three_blocks_with_a_head_list() {
    check_case(&cases()[0]);
}

#[test]
fn linear_projection_and_deep_transformers() {
    check_case(&cases()[1]);
}

#[test]
fn weight_check_applies_to_other_configs() {
    let case = &cases()[0];
    let dir = tempfile::tempdir().unwrap();
    write_model(
        dir.path(),
        case.text.clone(),
        case.unet.clone(),
        case.vae.clone(),
    );
    // The 3-block UNet's weights do not fit the fixture's 2-block config.
    std::fs::copy(
        tiny_model_dir().join("unet/config.json"),
        dir.path().join("unet/config.json"),
    )
    .unwrap();
    let e = StableDiffusion::load_dir(dir.path(), &LoadOptions::default())
        .err()
        .expect("a mismatched UNet is refused")
        .to_string();
    assert!(
        e.contains("unet/config.json") || e.contains("UNet weights"),
        "{e}"
    );
}

/// Random weights at a config's shapes (what the benchmark uses for SD1.5) give a working model.
#[test]
fn random_weights_build_a_working_model() {
    let dir = tiny_model_dir();
    let configs = infusion_repl::sd::ModelConfigs {
        text: TextEncoderConfig::from_file(&dir.join("text_encoder/config.json")).unwrap(),
        unet: UNetConfig::from_file(&dir.join("unet/config.json")).unwrap(),
        vae: VaeConfig::from_file(&dir.join("vae/config.json")).unwrap(),
        scheduler: infusion_repl::sd::SchedulerConfig::from_file(
            &dir.join("scheduler/scheduler_config.json"),
        )
        .unwrap(),
    };
    let opts = LoadOptions {
        vocabulary: Some(dir.join("tokenizer")),
        ..LoadOptions::default()
    };
    let sd = StableDiffusion::random(&configs, &opts, 1).unwrap();
    let g = sd
        .generate(
            "a cat",
            &GenerateOptions {
                steps: 2,
                ..Default::default()
            },
            &Job::quiet(),
        )
        .unwrap();
    assert_eq!(g.image.dims(), [1, 3, 32, 32]);
    assert!(max_abs(&g.latents).is_finite());
    assert_eq!(sd.unet_fingerprint(), "random:1");
}
