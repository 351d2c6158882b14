//! SD1.x checkpoints in one file, in the original (LDM) layout, as most SD1.5 derivatives are
//! shared: `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE), and
//! `cond_stage_model.transformer.*` (CLIP text encoder).
//!
//! The model asks for its tensors by their diffusers names; [`ldm_unet_key`] and
//! [`ldm_vae_key`] give the file's key of each, from the component's config, as diffusers'
//! `single_file_utils` conversion does (and its `convert_diffusers_to_original_stable_diffusion`
//! script writes). The VAE's attention weights are 1x1 convolutions there; the loader takes them
//! for the linear layers they are. When the file also holds an EMA copy of the UNet
//! (`model_ema.*`), that copy is taken unless the plain weights are asked for: it generates
//! better, and Infusion never trains the UNet (diffusers' `extract_ema=True`; the official
//! diffusers SD1.5 folder holds the EMA weights too, so both give concepts the same fingerprint).

use std::path::{Path, PathBuf};

use super::config::{PerBlock, UNetConfig, VaeConfig};
use super::weights::WeightFiles;
use crate::error::{Error, Result};

/// The UNet's prefix in a single file.
pub const UNET: &str = "model.diffusion_model.";
/// The VAE's prefix in a single file.
pub const VAE: &str = "first_stage_model.";
/// The text encoder's prefix in a single file.
pub const TEXT: &str = "cond_stage_model.transformer.";
/// The prefix of the EMA copy of the UNet (followed by the LDM key without its dots).
pub const UNET_EMA: &str = "model_ema.diffusion_model";

/// The key of the EMA copy of UNet tensor `key` (an LDM key after [`UNET`]), as the original
/// training code (`LitEma`) names it and diffusers reads it: its dots dropped.
pub fn ema_key(key: &str) -> String {
    format!("{UNET_EMA}{}", key.replace('.', ""))
}

/// `name` with the first matching `(diffusers, ldm)` prefix swapped.
fn swap_prefix(name: &str, table: &[(String, String)]) -> Option<String> {
    table
        .iter()
        .find(|(hf, _)| name.starts_with(hf.as_str()))
        .map(|(hf, ldm)| format!("{ldm}{}", &name[hf.len()..]))
}

/// A ResNet block's parts: diffusers -> LDM.
const UNET_RESNET: [(&str, &str); 6] = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
];

fn layers(per_block: &PerBlock<usize>, i: usize) -> usize {
    per_block.get(i)
}

/// The `(diffusers prefix, LDM prefix)` table of a UNet's blocks.
fn unet_table(cfg: &UNetConfig) -> Vec<(String, String)> {
    let n = cfg.n_blocks();
    let mut t = vec![];
    // input_blocks: 0 is conv_in; then each down block's layers, and its downsampler.
    let mut input = 1;
    for i in 0..n {
        let l = layers(&cfg.layers_per_block, i);
        for j in 0..l {
            t.push((
                format!("down_blocks.{i}.resnets.{j}."),
                format!("input_blocks.{input}.0."),
            ));
            t.push((
                format!("down_blocks.{i}.attentions.{j}."),
                format!("input_blocks.{input}.1."),
            ));
            input += 1;
        }
        if i + 1 < n {
            t.push((
                format!("down_blocks.{i}.downsamplers.0.conv."),
                format!("input_blocks.{input}.0.op."),
            ));
            input += 1;
        }
    }
    t.push(("mid_block.attentions.0.".into(), "middle_block.1.".into()));
    for j in 0..2 {
        t.push((
            format!("mid_block.resnets.{j}."),
            format!("middle_block.{}.", 2 * j),
        ));
    }
    // output_blocks: each up block's layers (one more than its down block's), the upsampler
    // beside the last one (after its attention when it has one).
    let mut output = 0;
    for i in 0..n {
        let l = layers(&cfg.layers_per_block, n - 1 - i) + 1;
        let has_attention = cfg.up_block_types[i] == "CrossAttnUpBlock2D";
        for j in 0..l {
            t.push((
                format!("up_blocks.{i}.resnets.{j}."),
                format!("output_blocks.{output}.0."),
            ));
            t.push((
                format!("up_blocks.{i}.attentions.{j}."),
                format!("output_blocks.{output}.1."),
            ));
            if j + 1 == l && i + 1 < n {
                t.push((
                    format!("up_blocks.{i}.upsamplers.0."),
                    format!("output_blocks.{output}.{}.", 1 + usize::from(has_attention)),
                ));
            }
            output += 1;
        }
    }
    t
}

/// The file key (after [`UNET`]) of the UNet tensor diffusers names `name`.
pub fn ldm_unet_key(name: &str, cfg: &UNetConfig) -> String {
    const FIXED: [(&str, &str); 10] = [
        ("time_embedding.linear_1.weight", "time_embed.0.weight"),
        ("time_embedding.linear_1.bias", "time_embed.0.bias"),
        ("time_embedding.linear_2.weight", "time_embed.2.weight"),
        ("time_embedding.linear_2.bias", "time_embed.2.bias"),
        ("conv_in.weight", "input_blocks.0.0.weight"),
        ("conv_in.bias", "input_blocks.0.0.bias"),
        ("conv_norm_out.weight", "out.0.weight"),
        ("conv_norm_out.bias", "out.0.bias"),
        ("conv_out.weight", "out.2.weight"),
        ("conv_out.bias", "out.2.bias"),
    ];
    if let Some((_, ldm)) = FIXED.iter().find(|(hf, _)| *hf == name) {
        return ldm.to_string();
    }
    let mut key = name.to_string();
    if name.contains("resnets.") {
        for (hf, ldm) in UNET_RESNET {
            key = key.replace(&format!(".{hf}."), &format!(".{ldm}."));
        }
    }
    swap_prefix(&key, &unet_table(cfg)).unwrap_or(key)
}

/// The file key (after [`VAE`]) of the VAE tensor diffusers names `name`.
pub fn ldm_vae_key(name: &str, cfg: &VaeConfig) -> String {
    let n = cfg.block_out_channels.len();
    let mut table: Vec<(String, String)> = vec![];
    for part in ["encoder", "decoder"] {
        table.push((
            format!("{part}.conv_norm_out."),
            format!("{part}.norm_out."),
        ));
        table.push((
            format!("{part}.mid_block.attentions.0."),
            format!("{part}.mid.attn_1."),
        ));
        for j in 0..2 {
            table.push((
                format!("{part}.mid_block.resnets.{j}."),
                format!("{part}.mid.block_{}.", j + 1),
            ));
        }
    }
    for i in 0..n {
        for j in 0..=cfg.layers_per_block {
            table.push((
                format!("encoder.down_blocks.{i}.resnets.{j}."),
                format!("encoder.down.{i}.block.{j}."),
            ));
            table.push((
                format!("decoder.up_blocks.{i}.resnets.{j}."),
                format!("decoder.up.{}.block.{j}.", n - 1 - i),
            ));
        }
        table.push((
            format!("encoder.down_blocks.{i}.downsamplers.0."),
            format!("encoder.down.{i}.downsample."),
        ));
        table.push((
            format!("decoder.up_blocks.{i}.upsamplers.0."),
            format!("decoder.up.{}.upsample.", n - 1 - i),
        ));
    }
    let key = swap_prefix(name, &table).unwrap_or_else(|| name.to_string());
    let key = key.replace(".conv_shortcut.", ".nin_shortcut.");
    if !key.contains(".attn_1.") {
        return key;
    }
    const ATTENTION: [(&str, &str); 5] = [
        ("group_norm.", "norm."),
        ("to_q.", "q."),
        ("to_k.", "k."),
        ("to_v.", "v."),
        ("to_out.0.", "proj_out."),
    ];
    let (head, tail) = key.split_at(key.find(".attn_1.").unwrap_or(0) + ".attn_1.".len());
    match ATTENTION.iter().find(|(hf, _)| tail.starts_with(hf)) {
        Some((hf, ldm)) => format!("{head}{ldm}{}", &tail[hf.len()..]),
        None => key,
    }
}

/// What kind of checkpoint a file is, from its keys and shapes; `Err` names what it is when it
/// is not an SD1.x model with the text-to-image UNet.
pub fn check_kind(path: &Path, files: &WeightFiles) -> Result<()> {
    let refuse = |what: &str| {
        Err(Error::Unsupported(format!(
            "{} is {what}; only Stable Diffusion 1.x text-to-image checkpoints (4-channel UNet, \
             CLIP ViT-L/14 text encoder) are supported",
            path.display()
        )))
    };
    if files.has_prefix("conditioner.embedders.") {
        return refuse("an SDXL checkpoint");
    }
    if files.has_prefix("cond_stage_model.model.") {
        return refuse("a Stable Diffusion 2.x checkpoint (OpenCLIP text encoder)");
    }
    if !files.has_prefix(UNET) && !files.has_prefix(UNET_EMA) {
        return refuse("not a Stable Diffusion checkpoint (no `model.diffusion_model.*` tensors)");
    }
    let conv_in = files
        .shape_of(&format!("{UNET}input_blocks.0.0.weight"))
        .or_else(|| files.shape_of(&ema_key("input_blocks.0.0.weight")));
    if let Some([_, c, ..]) = conv_in.as_deref() {
        if *c != 4 {
            return refuse(&format!(
                "a checkpoint whose UNet takes {c} channels (an inpainting or other variant)"
            ));
        }
    }
    Ok(())
}

/// Which UNet weights of a single file were taken, and what else it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnetWeights {
    /// The EMA copy was taken.
    pub ema: bool,
    /// The file holds the other kind too.
    pub both: bool,
}

/// The UNet of a single file, read through the LDM names. `ema`: `Some(true)` takes the EMA
/// copy, `Some(false)` the plain weights, `None` the EMA copy when there is one.
pub fn unet_files(
    path: &Path,
    cfg: &UNetConfig,
    ema: Option<bool>,
) -> Result<(WeightFiles, UnetWeights)> {
    let files = WeightFiles::open("UNet", &[path.to_path_buf()])?;
    let (has_ema, has_plain) = (files.has_prefix(UNET_EMA), files.has_prefix(UNET));
    let lacks = |what: &str| {
        Err(Error::arg(
            "ema",
            format!("{} holds no {what} UNet weights", path.display()),
        ))
    };
    match ema {
        Some(true) if !has_ema => return lacks("EMA (`model_ema.*`)"),
        Some(false) if !has_plain => return lacks("plain (`model.diffusion_model.*`)"),
        _ => {}
    }
    let which = UnetWeights {
        ema: ema.unwrap_or(has_ema),
        both: has_ema && has_plain,
    };
    let cfg = cfg.clone();
    Ok((
        files.with_names(move |name| {
            let key = ldm_unet_key(name, &cfg);
            if which.ema {
                ema_key(&key)
            } else {
                format!("{UNET}{key}")
            }
        }),
        which,
    ))
}

/// The VAE of a single file (keys under `prefix`: [`VAE`] in a checkpoint, nothing in a VAE
/// file of the original layout).
pub fn vae_files(path: &Path, cfg: &VaeConfig, prefix: &'static str) -> Result<WeightFiles> {
    let cfg = cfg.clone();
    Ok(WeightFiles::open("VAE", &[path.to_path_buf()])?
        .with_names(move |name| format!("{prefix}{}", ldm_vae_key(name, &cfg))))
}

/// The text encoder of a single file: `cond_stage_model.transformer.` + the diffusers name
/// (with `text_model.`, or without it in older files).
pub fn text_files(path: &Path) -> Result<WeightFiles> {
    let files = WeightFiles::open("text encoder", &[path.to_path_buf()])?;
    let full = files.has_prefix(&format!("{TEXT}text_model."));
    Ok(files.with_names(move |name| {
        if full {
            format!("{TEXT}{name}")
        } else {
            format!("{TEXT}{}", name.strip_prefix("text_model.").unwrap_or(name))
        }
    }))
}

/// Whether `path` names a single checkpoint file rather than a folder.
pub fn is_single_file(path: &Path) -> bool {
    path.is_file()
        && path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e, "safetensors" | "ckpt" | "pt" | "pth" | "bin"))
}

/// Refuses pickled checkpoints (never unpickled: they can run code) with how to convert them.
pub fn check_safetensors(path: &Path) -> Result<PathBuf> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("safetensors") => Ok(path.to_path_buf()),
        _ => Err(Error::Unsupported(format!(
            "{} is a pickled PyTorch checkpoint, which is never unpickled here (it can run \
             code): convert it to safetensors first, e.g. with diffusers' \
             `StableDiffusionPipeline.from_single_file(...).save_pretrained(DIR)`",
            path.display()
        ))),
    }
}
