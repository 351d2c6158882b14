//! Model configurations, read from the diffusers / transformers `config.json` files.
//!
//! Every size the models use comes from here: nothing in the model code assumes SD1.5's 320
//! channels, 768-wide text states, 8 heads, 77 tokens or a VAE scale factor of 8. The `sd15()`
//! presets mirror the published SD1.5 files for benchmarks that build the model with random weights.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A value diffusers accepts either once for every block or as one value per block.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: Copy> PerBlock<T> {
    /// The value for block `i` of `n` (a single value applies to every block).
    pub fn get(&self, i: usize) -> T {
        match self {
            PerBlock::One(v) => *v,
            PerBlock::Many(v) => v[i.min(v.len() - 1)],
        }
    }

    /// The largest value over `n` blocks.
    fn max_value(&self, n: usize) -> T
    where
        T: Ord + Default,
    {
        (0..n).map(|i| self.get(i)).max().unwrap_or_default()
    }

    fn check_len(&self, n: usize, name: &str) -> std::result::Result<(), String> {
        match self {
            PerBlock::Many(v) if v.len() != n => Err(format!(
                "`{name}` has {} values, expected one per down block ({n})",
                v.len()
            )),
            _ => Ok(()),
        }
    }
}

/// Reads and parses a JSON config, naming the file on any error.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = crate::util::fs::read_regular(path)?;
    serde_json::from_slice(&bytes).map_err(|e| Error::config(path, e))
}

fn default_true() -> bool {
    true
}

/// `unet/config.json` (diffusers `UNet2DConditionModel`), restricted to what SD1.x uses.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    #[serde(default = "UNetConfig::default_mid")]
    pub mid_block_type: Option<String>,
    pub layers_per_block: PerBlock<usize>,
    /// SD1.x quirk: this is the number of heads, not the head size.
    pub attention_head_dim: PerBlock<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_attention_heads: Option<PerBlock<usize>>,
    pub cross_attention_dim: PerBlock<usize>,
    #[serde(default = "UNetConfig::default_tlpb")]
    pub transformer_layers_per_block: PerBlock<usize>,
    pub norm_num_groups: usize,
    #[serde(default = "UNetConfig::default_norm_eps")]
    pub norm_eps: f64,
    #[serde(default = "default_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "UNetConfig::default_one")]
    pub downsample_padding: usize,
    #[serde(default = "UNetConfig::default_one_f")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "UNetConfig::default_silu")]
    pub act_fn: String,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default = "UNetConfig::default_conv_kernel")]
    pub conv_in_kernel: usize,
    #[serde(default = "UNetConfig::default_conv_kernel")]
    pub conv_out_kernel: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_size: Option<usize>,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default)]
    pub upcast_attention: bool,
    // Options of other UNets: read so that a config using them is refused, not misread.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub only_cross_attention: Option<PerBlock<bool>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dual_cross_attention: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_embed_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_class_embeds: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addition_embed_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder_hid_dim: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_embedding_dim: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_embedding_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestep_post_act: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resnet_time_scale_shift: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resnet_skip_time_act: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resnet_out_scale_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cross_attention_norm: Option<String>,
}

impl UNetConfig {
    fn default_mid() -> Option<String> {
        Some("UNetMidBlock2DCrossAttn".into())
    }
    fn default_tlpb() -> PerBlock<usize> {
        PerBlock::One(1)
    }
    fn default_norm_eps() -> f64 {
        1e-5
    }
    fn default_one() -> usize {
        1
    }
    fn default_one_f() -> f64 {
        1.0
    }
    fn default_silu() -> String {
        "silu".into()
    }
    fn default_conv_kernel() -> usize {
        3
    }

    /// The published SD1.5 `unet/config.json`.
    pub fn sd15() -> Self {
        let json = r#"{
            "in_channels": 4, "out_channels": 4,
            "block_out_channels": [320, 640, 1280, 1280],
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "layers_per_block": 2, "attention_head_dim": 8, "cross_attention_dim": 768,
            "norm_num_groups": 32, "norm_eps": 1e-05, "sample_size": 64,
            "flip_sin_to_cos": true, "freq_shift": 0, "downsample_padding": 1, "mid_block_scale_factor": 1
        }"#;
        serde_json::from_str(json).expect("the built-in SD1.5 UNet config parses")
    }

    /// The `config.json` diffusers' `UNet2DConditionModel.from_pretrained` reads for this UNet
    /// (what a model made from a single file has no copy of).
    pub fn to_diffusers_json(&self) -> serde_json::Value {
        let mut json = serde_json::to_value(self).expect("a UNet config serializes");
        json["_class_name"] = "UNet2DConditionModel".into();
        json
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let cfg: Self = read_json(path)?;
        cfg.validate().map_err(|msg| Error::config(path, msg))?;
        Ok(cfg)
    }

    /// Number of down (and up) blocks.
    pub fn n_blocks(&self) -> usize {
        self.block_out_channels.len()
    }

    /// Heads of the attention layers in down block `i` (mid block: the last one; up blocks:
    /// reversed). SD1.x configs give the head count in `attention_head_dim`.
    pub fn heads(&self) -> &PerBlock<usize> {
        self.num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim)
    }

    /// Width of the time embedding.
    pub fn time_embed_dim(&self) -> usize {
        self.block_out_channels[0] * 4
    }

    /// Checks that this is a UNet the model code builds faithfully; names the first option that is not.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let n = self.n_blocks();
        if n == 0 {
            return Err("`block_out_channels` is empty".into());
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(format!(
                "{} down and {} up block types for {n} entries of `block_out_channels`",
                self.down_block_types.len(),
                self.up_block_types.len()
            ));
        }
        for (name, v) in [
            ("layers_per_block", &self.layers_per_block),
            ("attention_head_dim", &self.attention_head_dim),
            ("cross_attention_dim", &self.cross_attention_dim),
            (
                "transformer_layers_per_block",
                &self.transformer_layers_per_block,
            ),
        ] {
            v.check_len(n, name)?;
        }
        if let Some(h) = &self.num_attention_heads {
            h.check_len(n, "num_attention_heads")?;
        }
        for t in &self.down_block_types {
            if t != "CrossAttnDownBlock2D" && t != "DownBlock2D" {
                return Err(format!("down block type `{t}` is not supported"));
            }
        }
        for t in &self.up_block_types {
            if t != "CrossAttnUpBlock2D" && t != "UpBlock2D" {
                return Err(format!("up block type `{t}` is not supported"));
            }
        }
        if self.mid_block_type.as_deref() != Some("UNetMidBlock2DCrossAttn") {
            return Err(format!(
                "mid block type {:?} is not supported (SD1.x uses UNetMidBlock2DCrossAttn)",
                self.mid_block_type
            ));
        }
        if self.norm_num_groups == 0 {
            return Err("norm_num_groups is 0".into());
        }
        check_sizes(&[
            ("the number of blocks", n, MAX_BLOCKS),
            (
                "layers_per_block",
                self.layers_per_block.max_value(n),
                MAX_LAYERS,
            ),
            (
                "transformer_layers_per_block",
                self.transformer_layers_per_block.max_value(n),
                MAX_LAYERS,
            ),
            (
                "block_out_channels",
                self.block_out_channels.iter().copied().max().unwrap_or(0),
                MAX_WIDTH,
            ),
            (
                "cross_attention_dim",
                self.cross_attention_dim.max_value(n),
                MAX_WIDTH,
            ),
            (
                "sample_size",
                self.sample_size.unwrap_or(1),
                MAX_SAMPLE_SIZE,
            ),
        ])?;
        if self.sample_size == Some(0) {
            return Err("sample_size is 0: the native latent size must be at least 1".into());
        }
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            if c % self.norm_num_groups != 0 {
                return Err(format!(
                    "block_out_channels[{i}] = {c} is not a multiple of norm_num_groups = {}",
                    self.norm_num_groups
                ));
            }
            let heads = self.heads().get(i);
            if heads == 0 || c % heads != 0 {
                return Err(format!(
                    "block {i}: {c} channels cannot be split into {heads} attention heads"
                ));
            }
        }
        if self.act_fn != "silu" {
            return Err(format!("act_fn `{}` is not supported", self.act_fn));
        }
        if self.conv_in_kernel.is_multiple_of(2) || self.conv_out_kernel.is_multiple_of(2) {
            return Err("even conv_in_kernel / conv_out_kernel are not supported".into());
        }
        let unsupported: [(&str, bool); 15] = [
            (
                "only_cross_attention",
                !matches!(self.only_cross_attention, None | Some(PerBlock::One(false)))
                    && !matches!(&self.only_cross_attention, Some(PerBlock::Many(v)) if v.iter().all(|b| !b)),
            ),
            (
                "dual_cross_attention",
                self.dual_cross_attention == Some(true),
            ),
            ("class_embed_type", self.class_embed_type.is_some()),
            ("num_class_embeds", self.num_class_embeds.is_some()),
            ("addition_embed_type", self.addition_embed_type.is_some()),
            ("time_cond_proj_dim", self.time_cond_proj_dim.is_some()),
            ("encoder_hid_dim", self.encoder_hid_dim.is_some()),
            ("time_embedding_dim", self.time_embedding_dim.is_some()),
            (
                "time_embedding_type",
                !matches!(
                    self.time_embedding_type.as_deref(),
                    None | Some("positional")
                ),
            ),
            ("timestep_post_act", self.timestep_post_act.is_some()),
            (
                "resnet_time_scale_shift",
                !matches!(
                    self.resnet_time_scale_shift.as_deref(),
                    None | Some("default")
                ),
            ),
            (
                "resnet_skip_time_act",
                self.resnet_skip_time_act == Some(true),
            ),
            (
                "resnet_out_scale_factor",
                !matches!(self.resnet_out_scale_factor, None | Some(1.0)),
            ),
            (
                "attention_type",
                !matches!(self.attention_type.as_deref(), None | Some("default")),
            ),
            ("cross_attention_norm", self.cross_attention_norm.is_some()),
        ];
        if let Some((name, _)) = unsupported.iter().find(|(_, bad)| *bad) {
            return Err(format!(
                "option `{name}` is set: only SD1.x UNets are supported"
            ));
        }
        Ok(())
    }
}

/// Bounds far past any SD1.x model (SD1.5: 4 blocks of 2 layers, 1280 channels, 12 text
/// layers, 1000 timesteps), so that a config asking for absurd sizes is refused before it
/// builds (or tries to allocate) anything.
const MAX_BLOCKS: usize = 8;
const MAX_LAYERS: usize = 16;
const MAX_WIDTH: usize = 16384;
const MAX_SAMPLE_SIZE: usize = 1024;
const MAX_TEXT_LAYERS: usize = 128;
const MAX_VOCAB: usize = 1 << 20;
const MAX_POSITIONS: usize = 4096;
const MAX_TRAIN_TIMESTEPS: usize = 100_000;

/// The first `(name, value, max)` whose value is past its bound, as an error.
fn check_sizes(sizes: &[(&str, usize, usize)]) -> std::result::Result<(), String> {
    match sizes.iter().find(|(_, v, max)| v > max) {
        Some((name, v, max)) => Err(format!(
            "{name} is {v}: at most {max} is accepted (far past any SD1.x model)"
        )),
        None => Ok(()),
    }
}

/// `vae/config.json` (diffusers `AutoencoderKL`).
#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "VaeConfig::default_rgb")]
    pub in_channels: usize,
    #[serde(default = "VaeConfig::default_rgb")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    #[serde(default)]
    pub down_block_types: Vec<String>,
    #[serde(default)]
    pub up_block_types: Vec<String>,
    pub layers_per_block: usize,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    #[serde(default)]
    pub sample_size: Option<usize>,
    #[serde(default = "VaeConfig::default_scaling")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
    #[serde(default = "default_true")]
    pub force_upcast: bool,
    #[serde(default = "UNetConfig::default_silu")]
    pub act_fn: String,
}

impl VaeConfig {
    fn default_rgb() -> usize {
        3
    }
    fn default_scaling() -> f64 {
        0.18215
    }

    /// The published SD1.5 `vae/config.json`.
    pub fn sd15() -> Self {
        let json = r#"{
            "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
            "latent_channels": 4, "norm_num_groups": 32, "sample_size": 512, "scaling_factor": 0.18215
        }"#;
        serde_json::from_str(json).expect("the built-in SD1.5 VAE config parses")
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let cfg: Self = read_json(path)?;
        cfg.validate().map_err(|msg| Error::config(path, msg))?;
        Ok(cfg)
    }

    /// Pixels per latent cell: 2^(number of blocks - 1).
    pub fn scale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err("`block_out_channels` is empty".into());
        }
        for t in &self.down_block_types {
            if t != "DownEncoderBlock2D" {
                return Err(format!("down block type `{t}` is not supported"));
            }
        }
        for t in &self.up_block_types {
            if t != "UpDecoderBlock2D" {
                return Err(format!("up block type `{t}` is not supported"));
            }
        }
        if !self.down_block_types.is_empty() && self.down_block_types.len() != n {
            return Err(format!(
                "{} down block types for {n} entries of `block_out_channels`",
                self.down_block_types.len()
            ));
        }
        if self.norm_num_groups == 0 {
            return Err("norm_num_groups is 0".into());
        }
        check_sizes(&[
            ("the number of blocks", n, MAX_BLOCKS),
            ("layers_per_block", self.layers_per_block, MAX_LAYERS),
            (
                "block_out_channels",
                self.block_out_channels.iter().copied().max().unwrap_or(0),
                MAX_WIDTH,
            ),
        ])?;
        if let Some(c) = self
            .block_out_channels
            .iter()
            .find(|&&c| c % self.norm_num_groups != 0)
        {
            return Err(format!(
                "{c} channels are not a multiple of norm_num_groups = {}",
                self.norm_num_groups
            ));
        }
        if self.act_fn != "silu" {
            return Err(format!("act_fn `{}` is not supported", self.act_fn));
        }
        Ok(())
    }
}

/// The activation of the CLIP text encoder's MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TextActivation {
    QuickGelu,
    Gelu,
    GeluNew,
}

/// `text_encoder/config.json` (transformers `CLIPTextConfig`).
#[derive(Debug, Clone, Deserialize)]
pub struct TextEncoderConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: TextActivation,
    #[serde(default = "UNetConfig::default_norm_eps")]
    pub layer_norm_eps: f64,
}

impl TextEncoderConfig {
    /// The published SD1.5 `text_encoder/config.json` (CLIP ViT-L/14's text tower).
    pub fn sd15() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            hidden_act: TextActivation::QuickGelu,
            layer_norm_eps: 1e-5,
        }
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let cfg: Self = read_json(path)?;
        if cfg.num_hidden_layers == 0 {
            return Err(Error::config(
                path,
                "num_hidden_layers is 0: the text encoder would hand the token embeddings on \
                 untransformed",
            ));
        }
        check_sizes(&[
            ("num_hidden_layers", cfg.num_hidden_layers, MAX_TEXT_LAYERS),
            ("hidden_size", cfg.hidden_size, MAX_WIDTH),
            ("intermediate_size", cfg.intermediate_size, 8 * MAX_WIDTH),
            ("vocab_size", cfg.vocab_size, MAX_VOCAB),
            (
                "max_position_embeddings",
                cfg.max_position_embeddings,
                MAX_POSITIONS,
            ),
        ])
        .map_err(|msg| Error::config(path, msg))?;
        if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads)
        {
            return Err(Error::config(
                path,
                format!(
                    "hidden_size {} cannot be split into {} heads",
                    cfg.hidden_size, cfg.num_attention_heads
                ),
            ));
        }
        Ok(cfg)
    }
}

/// A scheduler config value that is one of a few names, parsed once when the file is read: an
/// unknown name is an error naming the key and the names this tool knows.
macro_rules! config_names {
    ($(#[$meta:meta])* $ty:ident, $key:literal, default $default:ident,
     { $($(#[$vmeta:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
        #[serde(try_from = "String")]
        pub enum $ty {
            $($(#[$vmeta])* $variant,)+
        }

        impl $ty {
            /// The names the config file may give.
            pub const NAMES: &'static [&'static str] = &[$($text),+];

            /// The name as the config file gives it.
            pub fn name(self) -> &'static str {
                match self {
                    $(Self::$variant => $text,)+
                }
            }
        }

        impl Default for $ty {
            fn default() -> Self {
                Self::$default
            }
        }

        impl std::str::FromStr for $ty {
            type Err = String;

            fn from_str(s: &str) -> std::result::Result<Self, String> {
                match s {
                    $($text => Ok(Self::$variant),)+
                    _ => Err(format!(
                        "{} `{s}` is not supported (known: {})",
                        $key,
                        Self::NAMES.join(", ")
                    )),
                }
            }
        }

        impl TryFrom<String> for $ty {
            type Error = String;

            fn try_from(s: String) -> std::result::Result<Self, String> {
                s.parse()
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}

config_names!(
    /// How the betas go from `beta_start` to `beta_end` (ignored when `trained_betas` are given).
    BetaSchedule, "beta_schedule", default Linear, {
        Linear = "linear",
        /// Linear in the square root (SD1.x).
        ScaledLinear = "scaled_linear",
        /// The cosine schedule of improved DDPM.
        SquaredcosCapV2 = "squaredcos_cap_v2",
    }
);

config_names!(
    /// What the UNet predicts.
    PredictionType, "prediction_type", default Epsilon, {
        /// The noise (SD1.x).
        Epsilon = "epsilon",
        /// `sqrt(abar) noise - sqrt(1 - abar) x0` (SD2.x at 768 px).
        VPrediction = "v_prediction",
        /// The clean sample.
        Sample = "sample",
    }
);

config_names!(
    /// Where a run of n steps puts its timesteps among the training ones (diffusers' table 2 of
    /// "Common Diffusion Noise Schedules and Sample Steps are Flawed").
    TimestepSpacing, "timestep_spacing", default Leading, {
        Leading = "leading",
        Linspace = "linspace",
        Trailing = "trailing",
    }
);

/// `scheduler/scheduler_config.json`: the noise schedule and the keys every sampler reads, with
/// DDIM's defaults for the keys a file lacks (SD1.5's file is a PNDM config), as diffusers'
/// `Scheduler.from_config` of the pipeline's DDIM config would give them.
#[derive(Debug, Clone, Deserialize)]
pub struct SchedulerConfig {
    #[serde(default = "SchedulerConfig::default_t")]
    pub num_train_timesteps: usize,
    #[serde(default = "SchedulerConfig::default_beta_start")]
    pub beta_start: f64,
    #[serde(default = "SchedulerConfig::default_beta_end")]
    pub beta_end: f64,
    #[serde(default)]
    pub beta_schedule: BetaSchedule,
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
    #[serde(default = "default_true")]
    pub clip_sample: bool,
    #[serde(default = "SchedulerConfig::default_clip_range")]
    pub clip_sample_range: f64,
    #[serde(default = "default_true")]
    pub set_alpha_to_one: bool,
    #[serde(default)]
    pub steps_offset: usize,
    #[serde(default)]
    pub prediction_type: PredictionType,
    #[serde(default)]
    pub timestep_spacing: TimestepSpacing,
    #[serde(default)]
    pub thresholding: bool,
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
    /// PNDM: go straight to linear multistep, without the Runge-Kutta warm-up.
    #[serde(default)]
    pub skip_prk_steps: bool,
}

impl SchedulerConfig {
    fn default_t() -> usize {
        1000
    }
    fn default_beta_start() -> f64 {
        0.0001
    }
    fn default_beta_end() -> f64 {
        0.02
    }
    fn default_clip_range() -> f64 {
        1.0
    }

    /// SD1.5's schedule (its published file is a PNDM config with these values).
    pub fn sd15() -> Self {
        let json = r#"{
            "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "num_train_timesteps": 1000, "set_alpha_to_one": false, "steps_offset": 1, "clip_sample": false,
            "skip_prk_steps": true
        }"#;
        serde_json::from_str(json).expect("the built-in SD1.5 scheduler config parses")
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let cfg: Self = read_json(path)?;
        cfg.validate().map_err(|msg| Error::config(path, msg))?;
        Ok(cfg)
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.num_train_timesteps == 0 {
            return Err("num_train_timesteps is 0".into());
        }
        check_sizes(&[(
            "num_train_timesteps",
            self.num_train_timesteps,
            MAX_TRAIN_TIMESTEPS,
        )])?;
        if self.steps_offset >= self.num_train_timesteps {
            return Err(format!(
                "steps_offset {} is past the {} training timesteps (SD1.x uses 1)",
                self.steps_offset, self.num_train_timesteps
            ));
        }
        if self.thresholding {
            return Err("dynamic thresholding is not supported".into());
        }
        if self.rescale_betas_zero_snr {
            return Err("rescale_betas_zero_snr is not supported".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_unet() -> serde_json::Value {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-sd/unet/config.json");
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    }

    fn validate(v: &serde_json::Value) -> std::result::Result<(), String> {
        let cfg: UNetConfig = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
        cfg.validate()
    }

    #[test]
    fn tiny_and_sd15_configs_are_valid() {
        validate(&tiny_unet()).unwrap();
        UNetConfig::sd15().validate().unwrap();
        VaeConfig::sd15().validate().unwrap();
        SchedulerConfig::sd15().validate().unwrap();
        assert_eq!(VaeConfig::sd15().scale_factor(), 8);
        assert_eq!(UNetConfig::sd15().heads().get(3), 8);
    }

    #[test]
    fn bad_unet_configs_are_refused_with_the_option_named() {
        let cases: &[(&str, serde_json::Value, &str)] = &[
            ("norm_num_groups", serde_json::json!(0), "norm_num_groups"),
            ("norm_num_groups", serde_json::json!(7), "norm_num_groups"),
            (
                "attention_head_dim",
                serde_json::json!([2]),
                "attention_head_dim",
            ),
            ("attention_head_dim", serde_json::json!(0), "heads"),
            ("attention_head_dim", serde_json::json!(3), "heads"),
            ("block_out_channels", serde_json::json!([]), "empty"),
            ("block_out_channels", serde_json::json!([32]), "block types"),
            (
                "layers_per_block",
                serde_json::json!([1, 2, 3]),
                "layers_per_block",
            ),
            (
                "class_embed_type",
                serde_json::json!("timestep"),
                "class_embed_type",
            ),
            (
                "resnet_time_scale_shift",
                serde_json::json!("scale_shift"),
                "resnet_time_scale_shift",
            ),
            (
                "mid_block_type",
                serde_json::json!("UNetMidBlock2DSimpleCrossAttn"),
                "mid block",
            ),
            ("act_fn", serde_json::json!("gelu"), "act_fn"),
        ];
        for (key, value, needle) in cases {
            let mut v = tiny_unet();
            v[*key] = value.clone();
            let e = validate(&v).expect_err(key);
            assert!(e.contains(needle), "{key} = {value}: {e}");
        }
    }

    #[test]
    fn per_block_values_follow_diffusers_order() {
        let v: PerBlock<usize> = serde_json::from_str("[1, 2, 4]").unwrap();
        assert_eq!((v.get(0), v.get(2)), (1, 4));
        let one: PerBlock<usize> = serde_json::from_str("8").unwrap();
        assert_eq!((one.get(0), one.get(3)), (8, 8));
    }

    #[test]
    fn scheduler_defaults_are_ddims() {
        // A PNDM config like SD1.5's, without DDIM's keys.
        let cfg: SchedulerConfig = serde_json::from_str(
            r#"{"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear",
                "beta_start": 0.00085, "beta_end": 0.012, "skip_prk_steps": true,
                "set_alpha_to_one": false, "steps_offset": 1, "clip_sample": false}"#,
        )
        .unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.timestep_spacing, TimestepSpacing::Leading);
        assert_eq!(cfg.prediction_type, PredictionType::Epsilon);
        assert_eq!(cfg.beta_schedule, BetaSchedule::ScaledLinear);
        let bad: SchedulerConfig = serde_json::from_str(r#"{"thresholding": true}"#).unwrap();
        assert!(bad.validate().unwrap_err().contains("thresholding"));
    }

    #[test]
    fn unknown_scheduler_names_are_refused_with_the_key_and_the_known_names() {
        for (key, value, known) in [
            ("timestep_spacing", "uniform", "leading, linspace, trailing"),
            ("prediction_type", "flow", "epsilon, v_prediction, sample"),
            (
                "beta_schedule",
                "sigmoid",
                "linear, scaled_linear, squaredcos_cap_v2",
            ),
        ] {
            let json = format!(r#"{{"{key}": "{value}"}}"#);
            let e = serde_json::from_str::<SchedulerConfig>(&json)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(&format!(
                    "{key} `{value}` is not supported (known: {known})"
                )),
                "{e}"
            );
        }
        // The names round-trip through the file's spelling.
        let cfg: SchedulerConfig =
            serde_json::from_str(r#"{"prediction_type": "v_prediction"}"#).unwrap();
        assert_eq!(cfg.prediction_type, PredictionType::VPrediction);
        assert_eq!(cfg.prediction_type.name(), "v_prediction");
    }
}
