//! The `infusion-repl` command line.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, CommandFactory, Parser, Subcommand};

use crate::actions::{self, ModelRequest, TrainEnd};
use crate::app::bench::BenchOptions;
use crate::app::script::{RunError, ScriptConfig, Session};
use crate::app::signals::Signals;
use crate::compare::CompareOptions;
use crate::customize::generate::{generate_pair, PairOptions};
use crate::customize::set::ConceptSet;
use crate::error::{Error, Result};
use crate::infusion::maps::AttentionMaps;
use crate::job::Job;
use crate::sd::device::{parse_device, parse_dtype};
use crate::sd::fused::Kernels;
use crate::sd::pipeline::{
    load_noise, GenerateOptions, LoadOptions, ModelConfigs, StableDiffusion,
};
use crate::sd::sampler::{SamplerKind, SamplerOptions};
use crate::train::{Prior, TrainOptions};

#[derive(Debug, Parser)]
#[command(
    name = "infusion-repl",
    version,
    about = "Customize Stable Diffusion 1.5 with Infusion",
    long_about = "Customize Stable Diffusion 1.5 with Infusion.\n\nWith no argument: an interactive Rhai REPL. With FILE.rhai: runs that recipe (the arguments after it reach it as `ARGS`). Or one of the commands below.",
    override_usage = "infusion-repl [OPTIONS]                      (the REPL)\n       infusion-repl [OPTIONS] FILE.rhai [ARGS]...  (a recipe)\n       infusion-repl [OPTIONS] <COMMAND>"
)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

/// The command line of a recipe run: everything after the file goes to the script (its own
/// `--help` too).
#[derive(Debug, Parser)]
#[command(
    name = "infusion-repl",
    disable_help_flag = true,
    disable_version_flag = true
)]
struct ScriptCli {
    #[command(flatten)]
    global: GlobalArgs,
    script: PathBuf,
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

/// The methods' own options given as `--set KEY=VALUE`, typed as the method that has the
/// option declares it (the request refuses an option the chosen method does not have).
fn method_settings(given: &[String]) -> Result<crate::methods::Settings> {
    use crate::methods::SettingValue;
    let mut out = crate::methods::Settings::new();
    for item in given {
        let (key, value) = item.split_once('=').ok_or_else(|| {
            Error::arg(
                "set",
                format!("{item:?}: give a method's option as KEY=VALUE"),
            )
        })?;
        let spec = crate::methods::REGISTRY
            .iter()
            .flat_map(|m| m.settings())
            .find(|s| s.name == key)
            .ok_or_else(|| {
                Error::arg(
                    "set",
                    format!("{key:?} is no method's option (see train --help, under --method)"),
                )
            })?;
        let v = match spec.default {
            SettingValue::Count(_) => serde_json::json!(value.parse::<u64>().map_err(|_| {
                Error::arg(
                    "set",
                    format!("{key}={value}: {key} is a count (1 or more)"),
                )
            })?),
            SettingValue::Word(_) => serde_json::json!(value),
            SettingValue::Number(_) => serde_json::json!(value
                .parse::<f64>()
                .map_err(|_| { Error::arg("set", format!("{key}={value}: {key} is a number")) })?),
        };
        out.insert(key.to_string(), v);
    }
    Ok(out)
}

/// `--method`'s long help: every method of the registry with its defaults.
fn method_help() -> String {
    let mut text = String::from(
        "The method (default: infusion, the paper's; with --resume, the checkpoint's):",
    );
    for m in crate::methods::REGISTRY {
        text.push_str(&format!(
            "\n  {}: {} ({} steps, batch {}, lr {})",
            m.name(),
            m.about(),
            m.default_steps(),
            m.default_batch(),
            m.default_lr(m.default_batch(), false)
        ));
        for s in m.settings() {
            let default = match s.default {
                crate::methods::SettingValue::Count(n) => n.to_string(),
                crate::methods::SettingValue::Word(w) => w.to_string(),
                crate::methods::SettingValue::Number(x) => x.to_string(),
            };
            text.push_str(&format!("\n      --set {}={default}: {}", s.name, s.doc));
        }
    }
    text
}

/// The commands, as clap knows them, and its `help`.
fn subcommands() -> Vec<String> {
    Cli::command()
        .get_subcommands()
        .map(|c| c.get_name().to_string())
        .chain(["help".to_string()])
        .collect()
}

/// The options before a command, as clap defines them, each spelling (`--long`, `-s`,
/// aliases): those that take a value (`--model X`) and all of them.
fn top_options() -> (Vec<String>, Vec<String>) {
    let cli = Cli::command();
    let spell = |a: &clap::Arg| -> Vec<String> {
        let longs = a
            .get_long_and_visible_aliases()
            .unwrap_or_default()
            .into_iter()
            .map(|l| format!("--{l}"));
        let shorts = a
            .get_short_and_visible_aliases()
            .unwrap_or_default()
            .into_iter()
            .map(|c| format!("-{c}"));
        longs.chain(shorts).collect()
    };
    let options: Vec<&clap::Arg> = cli.get_arguments().filter(|a| !a.is_positional()).collect();
    let with_values = options
        .iter()
        .filter(|a| a.get_action().takes_values())
        .flat_map(|a| spell(a))
        .collect();
    let all = options
        .iter()
        .flat_map(|a| spell(a))
        .chain(["--help", "-h", "--version", "-V"].map(String::from))
        .collect();
    (with_values, all)
}

/// Index of the first argument that is neither an option nor an option's value; `None` also
/// when an unknown option comes first (clap then reports it, with the tool's usage, not a
/// recipe's).
fn first_positional(args: &[OsString]) -> Option<usize> {
    let (with_values, known) = top_options();
    let mut i = 1;
    while i < args.len() {
        let a = args[i].to_string_lossy();
        if a == "--" {
            return (i + 1 < args.len()).then_some(i + 1);
        }
        if a.starts_with('-') {
            let name = a.split_once('=').map_or(a.as_ref(), |(n, _)| n);
            if !known.iter().any(|o| o == name) {
                return None;
            }
            if with_values.iter().any(|o| *o == a) {
                i += 1;
            }
            i += 1;
            continue;
        }
        return Some(i);
    }
    None
}

#[derive(Debug, Args)]
struct GlobalArgs {
    /// Model: a diffusers folder, a Hugging Face repo id (from the local cache) or a single
    /// .safetensors checkpoint of the original layout; default: the bundled tiny model.
    #[arg(
        long,
        global = true,
        env = "INFUSION_MODEL",
        help_heading = "Model options"
    )]
    model: Option<String>,
    /// cpu, cuda or cuda:N.
    #[arg(
        long,
        global = true,
        default_value = "cpu",
        help_heading = "Model options"
    )]
    device: String,
    /// f32, f16 (fp16) or bf16.
    #[arg(
        long,
        global = true,
        default_value = "f32",
        help_heading = "Model options"
    )]
    dtype: String,
    /// Single-file checkpoints: a diffusers folder whose configs describe it (default: SD1.5's).
    #[arg(
        long,
        global = true,
        value_name = "DIR",
        help_heading = "Model options"
    )]
    config: Option<String>,
    /// Another VAE: a diffusers VAE folder or a .safetensors file (diffusers or original layout).
    #[arg(
        long,
        global = true,
        value_name = "DIR|FILE",
        help_heading = "Model options"
    )]
    vae: Option<String>,
    /// Single-file checkpoints: insist on the EMA copy of the UNet weights (the default when
    /// the file has one).
    #[arg(
        long,
        global = true,
        help_heading = "Model options",
        overrides_with = "no_ema"
    )]
    ema: bool,
    /// Single-file checkpoints: use the plain UNet weights, not the EMA copy.
    #[arg(long, global = true, help_heading = "Model options")]
    no_ema: bool,
    /// REPL and recipes: never draw images in the terminal, print the saved file's path.
    #[arg(long)]
    no_images: bool,
    /// REPL and recipes: multiply the script engine's data limits (4 Mi array or BLOB
    /// elements, 1 Mi map entries, 128 MiB of text in one value) by N; 0 lifts them.
    #[arg(long, value_name = "N", default_value_t = 1)]
    script_limits: usize,
    /// naive (candle's composite ops) or fused (single-kernel attention and group norm + SiLU,
    /// used where nothing trains through them and no attention maps are asked for): what the
    /// layers of every model the command loads run (`kernels` of load_model in scripts).
    #[arg(
        long,
        global = true,
        env = "INFUSION_KERNELS",
        default_value = "naive",
        help_heading = "Model options"
    )]
    kernels: Kernels,
}

impl GlobalArgs {
    /// The files and folders the model is read from, where they are local paths (a repo id is
    /// none): outputs must not replace them.
    fn input_paths(&self) -> Vec<PathBuf> {
        [&self.model, &self.config, &self.vae]
            .into_iter()
            .flatten()
            .map(PathBuf::from)
            .filter(|p| p.exists())
            .collect()
    }

    fn model_request(&self) -> ModelRequest {
        ModelRequest {
            model: self.model.clone(),
            device: self.device.clone(),
            dtype: self.dtype.clone(),
            config: self.config.clone(),
            vae: self.vae.clone(),
            ema: match (self.ema, self.no_ema) {
                (true, _) => Some(true),
                (_, true) => Some(false),
                _ => None,
            },
            kernels: self.kernels,
        }
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate an image from a prompt; with concepts, the base and customized images.
    Generate(GenerateArgs),
    /// Train a concept from a folder of images.
    Train(TrainArgs),
    /// Time UNet calls, text-to-image, Infusion pairs, training steps and the largest
    /// self-attention alone (prints a table).
    Bench(BenchArgs),
    /// The paper's comparison: every method trained on the data, measured at each checkpoint
    /// (Fisher divergence, W2, CLIP-T / CLIP-I / DINO-I, file size); resumable, and split over
    /// a cluster's shards (--shard, or Slurm's / Kubernetes' environment), then merged.
    Compare(CompareArgs),
}

#[derive(Debug, Args)]
struct CompareArgs {
    /// A concept's folder of images (give --name and --word), or a dataset folder in the
    /// DreamBooth dataset's layout (a folder per subject and prompts_and_classes.txt).
    data: PathBuf,
    /// The concept's name (one concept's folder).
    #[arg(long)]
    name: Option<String>,
    /// Its class word (one concept's folder).
    #[arg(long)]
    word: Option<String>,
    /// The methods, comma-separated (default: every method).
    #[arg(long, value_delimiter = ',')]
    methods: Vec<String>,
    /// A method's option, METHOD.KEY=VALUE: its own (lora.rank=8), its training lr and batch
    /// (lora.lr=0.0002, dreambooth.batch=1), or prior preservation (dreambooth.prior=true,
    /// dreambooth.prior_images=200, dreambooth.prior_weight=1).
    #[arg(long = "set", value_name = "METHOD.KEY=VALUE")]
    set: Vec<String>,
    /// Training steps to measure at, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = CompareOptions::default().checkpoints)]
    checkpoints: Vec<usize>,
    /// W2: images per side for each prompt.
    #[arg(long, default_value_t = CompareOptions::default().samples)]
    samples: usize,
    /// W2: prompts (the first N of the subject's DreamBooth prompts).
    #[arg(long, default_value_t = CompareOptions::default().w2_prompts)]
    w2_prompts: usize,
    /// The Fisher divergence's samples (default: --samples).
    #[arg(long)]
    fisher_samples: Option<usize>,
    /// The Fisher divergence's prompts: the first N captions (default: --fisher-samples, one
    /// sample a caption).
    #[arg(long)]
    fisher_prompts: Option<usize>,
    /// The Fisher captions, one a line (default: the shipped list).
    #[arg(long)]
    captions: Option<PathBuf>,
    /// Prompts per W2 or CLIP / DINO cell (a killed run loses at most one chunk).
    #[arg(long, default_value_t = CompareOptions::default().prompt_chunk)]
    prompt_chunk: usize,
    /// CLIP / DINO: prompts (DreamBooth's, the first N).
    #[arg(long, default_value_t = CompareOptions::default().prompts)]
    prompts: usize,
    /// CLIP / DINO: images per prompt.
    #[arg(long, default_value_t = CompareOptions::default().images_per_prompt)]
    images_per_prompt: usize,
    /// Denoising steps of every generation.
    #[arg(long, default_value_t = CompareOptions::default().steps)]
    steps: usize,
    /// Guidance scale of every generation.
    #[arg(long, default_value_t = CompareOptions::default().guidance)]
    guidance: f64,
    /// The seed of training and of every generation.
    #[arg(long, default_value_t = CompareOptions::default().seed)]
    seed: u64,
    /// The CLIP folder (default: the bundled tiny one, with random weights).
    #[arg(long)]
    clip: Option<PathBuf>,
    /// The DINO folder (default: the bundled tiny one, with random weights).
    #[arg(long)]
    dino: Option<PathBuf>,
    /// The shared output folder (cells, curves.csv, table.md, charts).
    #[arg(long)]
    out: PathBuf,
    /// Run only shard K of N (default: the scheduler's environment, else everything).
    #[arg(long, value_name = "K/N", conflicts_with = "merge")]
    shard: Option<String>,
    /// The number of shards when JOB_COMPLETION_INDEX (a Kubernetes Indexed Job) gives the
    /// index.
    #[arg(long)]
    shard_count: Option<usize>,
    /// Build curves.csv, the charts and table.md from the cells there, and list the missing.
    #[arg(long)]
    merge: bool,
}

#[derive(Debug, Args)]
struct BenchArgs {
    /// `model`: the --model (default: the bundled tiny one); `sd15`: SD1.5's shapes with random
    /// weights.
    #[arg(long, default_value = "model")]
    shapes: String,
    /// Denoising steps of the text-to-image and pair rows (at least 1).
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// Timed runs per row after one warm-up; each row is their median (at least 1).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Images per forward and backward pass of the training rows (default: as `train`
    /// chooses).
    #[arg(long)]
    micro_batch: Option<usize>,
    /// Also write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Only these groups of rows, comma-separated: load, unet, vae (text encoder and VAE
    /// decode), txt2img, pair, train, attention, groupnorm, conv (two 3x3 convolutions per UNet
    /// level: channels in = out, and the up path's first) (load: a model from files, not
    /// `--shapes sd15`).
    #[arg(long, value_delimiter = ',', value_parser = crate::app::bench::GROUPS)]
    only: Vec<String>,
}

#[derive(Debug, Args)]
struct TrainArgs {
    /// Folder of 3-20 images of the concept (jpg, png, webp).
    folder: PathBuf,
    /// The concept's name: prompts call it `<NAME>`.
    #[arg(long)]
    name: String,
    /// Its class word (`cat`, `teapot`).
    #[arg(long)]
    word: String,
    /// Where to write the concept (default: NAME.safetensors; NAME-unet for a method that saves
    /// a UNet folder).
    #[arg(short, long)]
    out: Option<PathBuf>,
    /// The method (default: infusion, the paper's; with --resume, the checkpoint's).
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(crate::methods::names()),
          long_help = method_help())]
    method: Option<String>,
    /// LoRA: the rank of its factors.
    #[arg(long, help = format!("LoRA: the rank of its factors (default {})", crate::methods::lora::DEFAULT_RANK))]
    rank: Option<usize>,
    /// LoRA and DreamBooth: the identifier prompts put before the class word.
    #[arg(long, help = format!("LoRA and DreamBooth: the identifier prompts put before the class word (default {})", crate::methods::lora::DEFAULT_TRIGGER))]
    trigger: Option<String>,
    /// A method's own option, `KEY=VALUE` (repeat for several; each method's are listed under
    /// --method; --rank and --trigger are two of them).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// LoRA and DreamBooth: prior preservation, with class images the model makes of "a photo
    /// of a WORD".
    #[arg(long)]
    prior: bool,
    /// How many class images prior preservation makes (diffusers' default).
    #[arg(long, default_value_t = Prior::default().images)]
    prior_images: usize,
    /// The weight of the class images' loss.
    #[arg(long, default_value_t = Prior::default().weight)]
    prior_weight: f64,
    /// Keep the class images in this folder and take them from it next time (diffusers'
    /// --class_data_dir); default: made each run.
    #[arg(long)]
    prior_dir: Option<PathBuf>,
    /// A folder of loss masks, one PNG per image named as it (white counts, black does not);
    /// default: the plain loss over the whole image. Custom Diffusion takes none.
    #[arg(long)]
    masks: Option<PathBuf>,
    /// Training steps (in total, when resuming; default: the method's, see --method).
    #[arg(long)]
    train_steps: Option<usize>,
    /// AdamW's learning rate (default: the method's, see --method).
    #[arg(long)]
    lr: Option<f64>,
    /// Images per training step (default: the method's, see --method).
    #[arg(long)]
    batch: Option<usize>,
    /// Images per forward and backward pass: a step's batch goes through in slices of this
    /// many, their gradients summed: the same update in less memory, a little slower
    /// (default: the whole batch, fewer where the memory available holds fewer; 1 fits SD1.5
    /// Infusion training in 8 GB).
    #[arg(long)]
    micro_batch: Option<usize>,
    /// Seed of every random draw (a whole number from 0).
    #[arg(long, allow_negative_numbers = true, value_parser = parse_seed,
          help = format!("Seed of every random draw, a whole number from 0 (default {})", TrainOptions::default().seed))]
    seed: Option<u64>,
    /// Prompt template with `{}` for the class word (repeat for several; default: 10 templates).
    #[arg(long = "template")]
    templates: Vec<String>,
    /// Do not add horizontally flipped images.
    #[arg(long)]
    no_flip: bool,
    /// Write a checkpoint every N steps (into `NAME-checkpoints/` beside the output).
    #[arg(long)]
    checkpoint_every: Option<usize>,
    /// Continue from a checkpoint (`NAME-stepNNNNNN.safetensors`, a DreamBooth run's
    /// `NAME-stepNNNNNN` folder): its method and settings; `--train-steps` is the new total.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Store the deltas in f32 instead of f16.
    #[arg(long)]
    f32: bool,
}

#[derive(Debug, Args)]
struct GenerateArgs {
    /// The prompt; `<name>` places a concept given with --concept.
    #[arg(default_value = "a photo of a cat sitting by a teapot")]
    prompt: String,
    /// Where to write the PNG (replaced if it exists). Default: image.png, numbered
    /// image-1.png, image-2.png, ... when that exists.
    #[arg(short, long)]
    out: Option<PathBuf>,
    /// Number of images (seeds SEED, SEED+1, ...), written as OUT-0.png, OUT-1.png, ...
    #[arg(short = 'n', long = "images", default_value_t = 1)]
    n: usize,
    /// What the image should not show.
    #[arg(long, default_value = "")]
    negative: String,
    /// Seed of the initial noise: a whole number from 0, or -1 (the default) for a random one,
    /// printed and stored in the PNG.
    #[arg(long, default_value_t = -1, allow_negative_numbers = true, value_parser = parse_gen_seed)]
    seed: i64,
    /// Denoising steps.
    #[arg(long, default_value_t = GenerateOptions::default().steps)]
    steps: usize,
    /// The sampler, as diffusers' scheduler of that name.
    #[arg(long, default_value = "ddim", value_parser = SamplerKind::NAMES,
          long_help = format!("The sampler, as diffusers' scheduler of that name. {}", SamplerKind::help()))]
    scheduler: String,
    /// Karras sigmas.
    #[arg(long, long_help = format!("Karras sigmas ({}).", SamplerKind::karras_names()))]
    karras: bool,
    /// Classifier-free guidance scale.
    #[arg(long, default_value_t = GenerateOptions::default().guidance)]
    guidance: f64,
    /// Image width in pixels, a multiple of the VAE's scale factor (8 for SD1.5, 2 for the
    /// bundled tiny model); default: the model's size.
    #[arg(long)]
    width: Option<usize>,
    /// Image height in pixels, a multiple of the VAE's scale factor (8 for SD1.5, 2 for the
    /// bundled tiny model); default: the model's size.
    #[arg(long)]
    height: Option<usize>,
    /// A safetensors file whose tensor `noise` is the initial latent.
    #[arg(long)]
    noise: Option<PathBuf>,
    /// A concept to load (repeat for several); prompts use them as `<name>`:
    /// `[NAME=]FILE[:WORD[:TRIGGER[:SCALE]]]`, an Infusion file, a Textual Inversion or LoRA
    /// file or a DreamBooth unet/ folder. NAME: what prompts call it (default: the name it
    /// records, else its token or file name); WORD: the class word the plain model sees in its
    /// place (default: the one it records; files of other tools record none); TRIGGER: the
    /// identifier C's prompt puts before it, for a LoRA or DreamBooth (default: the recorded
    /// one); SCALE: a LoRA's strength, 1.0 by default.
    #[arg(long = "concept", value_name = "[NAME=]FILE[:WORD[:TRIGGER[:SCALE]]]")]
    concepts: Vec<PathBuf>,
    /// Load concepts trained on another model anyway.
    #[arg(long)]
    force: bool,
    /// Fraction of the steps in which C uses F's attention maps.
    #[arg(long, default_value_t = PairOptions::default().replace_steps)]
    replace_steps: f64,
    /// Write the cross-attention maps of F and C (every step) to this safetensors file.
    #[arg(long)]
    maps: Option<PathBuf>,
}

/// `[NAME=]FILE[:WORD[:TRIGGER[:SCALE]]]` (a path that exists as given is taken whole, colons,
/// equals signs and all; an empty WORD or TRIGGER is none: `pot.safetensors::sks`,
/// `pot.safetensors:teapot::0.8`).
fn concept_spec(spec: &Path, force: bool) -> Result<crate::methods::ConceptRequest> {
    let mut req = crate::methods::ConceptRequest {
        path: spec.to_path_buf(),
        force,
        ..Default::default()
    };
    if spec.exists() {
        return Ok(req);
    }
    let mut text = spec.to_string_lossy().into_owned();
    if let Some((name, rest)) = text.split_once('=') {
        if crate::util::names::check_name(name).is_ok() {
            req.name = Some(name.to_string());
            text = rest.to_string();
            req.path = PathBuf::from(&text);
            if req.path.exists() {
                return Ok(req);
            }
        }
    }
    let parts: Vec<&str> = text.split(':').collect();
    let Some(k) = (1..parts.len()).find(|&k| Path::new(&parts[..k].join(":")).exists()) else {
        return Ok(req); // not there: load_concept says so
    };
    let extra = &parts[k..];
    if extra.len() > 3 {
        return Err(Error::arg(
            "concept",
            format!("{text:?}: give [NAME=]FILE[:WORD[:TRIGGER[:SCALE]]]"),
        ));
    }
    let given = |i: usize| {
        extra
            .get(i)
            .filter(|t| !t.is_empty())
            .map(|t| t.to_string())
    };
    req.path = PathBuf::from(parts[..k].join(":"));
    req.word = given(0);
    req.trigger = given(1);
    if let Some(scale) = given(2) {
        req.scale = Some(scale.parse().map_err(|_| {
            Error::arg(
                "concept",
                format!("{text:?}: the strength {scale:?} is not a number"),
            )
        })?);
    }
    Ok(req)
}

fn load_model(global: &GlobalArgs, job: &Job) -> Result<StableDiffusion> {
    Ok(actions::load_model(&global.model_request(), job)?.sd)
}

/// The most images one `generate` makes (a larger set: run it again from another `--seed`).
const MAX_IMAGES: usize = 100_000;

/// The files `n` images go to: OUT itself for one, OUT-0.png, OUT-1.png, ... for several.
fn numbered(out: &Path, n: usize) -> Vec<PathBuf> {
    if n == 1 {
        return vec![out.to_path_buf()];
    }
    let stem = out.file_stem().unwrap_or_default().to_string_lossy();
    (0..n)
        .map(|i| out.with_file_name(format!("{stem}-{i}.png")))
        .collect()
}

/// `paths` as a note names them: one, or the first and the last.
fn names(paths: &[PathBuf]) -> String {
    match paths {
        [one] => one.display().to_string(),
        [first, .., last] => format!("{} ... {}", first.display(), last.display()),
        [] => String::new(),
    }
}

/// Where a generation's `n` images go, and the note to print once the work is sure to start.
/// `-o OUT` (a .png name): OUT itself for one image, replaced if it exists; for several,
/// OUT-0.png, OUT-1.png, ..., none of which may exist (the user named none of them). Without
/// `-o`: the first of image.png, image-1.png, ... (numbered the same way for several) whose
/// files are all new.
fn outputs(out: Option<&Path>, n: usize) -> Result<(Vec<PathBuf>, Option<String>)> {
    if let Some(out) = out {
        let paths = numbered(out, n);
        if n > 1 {
            if let Some(p) = paths.iter().find(|p| p.exists()) {
                return Err(Error::arg(
                    "out",
                    format!(
                        "{} exists: with several images, -o {} writes {} and replaces none of \
                         them (remove them or choose another name)",
                        p.display(),
                        out.display(),
                        names(&paths)
                    ),
                ));
            }
        }
        return Ok((paths, None));
    }
    let base = |k: usize| {
        PathBuf::from(if k == 0 {
            "image.png".to_string()
        } else {
            format!("image-{k}.png")
        })
    };
    const TRIES: usize = 10_000;
    let k = (0..TRIES)
        .find(|&k| numbered(&base(k), n).iter().all(|p| !p.exists()))
        .ok_or_else(|| {
            Error::arg(
                "out",
                format!(
                    "image.png and its numbered names up to {} are all taken: give -o",
                    base(TRIES - 1).display()
                ),
            )
        })?;
    let paths = numbered(&base(k), n);
    let taken = numbered(&base(0), n).into_iter().find(|p| p.exists());
    let note = taken.map(|t| {
        format!(
            "{} exists: writing {} (give -o to choose the file)",
            t.display(),
            names(&paths)
        )
    });
    Ok((paths, note))
}

/// Images are PNGs (their prompt and settings go in its text chunks): `-o` must say so.
fn check_png(out: &Path) -> Result<()> {
    if out
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("png"))
    {
        return Ok(());
    }
    Err(Error::arg(
        "out",
        format!(
            "{}: images are written as PNG (their prompt and settings go in its text chunks): \
             give a name ending in .png",
            out.display()
        ),
    ))
}

fn generate(global: &GlobalArgs, args: &GenerateArgs, job: &Job) -> Result<()> {
    if args.n == 0 {
        return Err(Error::arg("n", "must be at least 1"));
    }
    if args.n > MAX_IMAGES {
        return Err(Error::arg(
            "n",
            format!(
                "{} images: one command makes at most {MAX_IMAGES} (run it again from another \
                 --seed for more)",
                args.n
            ),
        ));
    }
    if args.n > 1 && args.maps.is_some() {
        return Err(Error::arg(
            "maps",
            "writes the maps of one image: use it without --images",
        ));
    }
    let sampler = SamplerOptions::parse(&args.scheduler, args.karras)?;
    let (outs, note) = outputs(args.out.as_deref(), args.n)?;
    let specs = args
        .concepts
        .iter()
        .map(|spec| concept_spec(spec, args.force))
        .collect::<Result<Vec<_>>>()?;
    // Where the images go is checked before the work, not found wrong after it: every file
    // written (with concepts, each image's .base.png and .custom.png too).
    let mut written: Vec<PathBuf> = outs.clone();
    if !specs.is_empty() {
        for out in &outs {
            written.push(out.with_extension("base.png"));
            written.push(out.with_extension("custom.png"));
        }
    }
    written.extend(args.maps.iter().cloned());
    let inputs: Vec<PathBuf> = specs
        .iter()
        .map(|r| r.path.clone())
        .chain(args.noise.iter().cloned())
        .chain(global.input_paths())
        .collect();
    let written_refs: Vec<&Path> = written.iter().map(PathBuf::as_path).collect();
    let input_refs: Vec<&Path> = inputs.iter().map(PathBuf::as_path).collect();
    crate::util::fs::check_not_an_input(&written_refs, &input_refs)?;
    if let Some(out) = &args.out {
        check_png(out)?;
    }
    let mut probed = std::collections::BTreeSet::new();
    for path in &written {
        // One probe write per folder; every file is checked to be replaceable.
        let folder = path.parent().map(Path::to_path_buf).unwrap_or_default();
        if probed.insert(folder) {
            crate::util::fs::check_writable(path)?;
        } else {
            crate::util::fs::check_output(path)?;
        }
        job.check()?;
    }
    let sd = load_model(global, job)?;
    let mut concepts = ConceptSet::new();
    for req in &specs {
        let path = req.path.clone();
        let c = actions::load_concept(req, Some(&sd), &mut concepts, job)?;
        eprintln!(
            "loaded <{}> ({}) from {}",
            c.name(),
            c.word(),
            path.display()
        );
    }
    let used = concepts.parse(&args.prompt)?.marks;
    for c in concepts
        .iter()
        .filter(|c| !used.iter().any(|m| m.name == c.name()))
    {
        job.warn(format!(
            "<{}> is loaded but the prompt does not use it (write <{}> where it goes)",
            c.name(),
            c.name()
        ));
    }
    let (seed, random) = match u64::try_from(args.seed) {
        Ok(s) => (s, false),
        Err(_) => (u64::from(rand::random::<u32>()), true),
    };
    let mut opts = PairOptions {
        generate: GenerateOptions {
            negative_prompt: args.negative.clone(),
            seed,
            steps: args.steps,
            guidance: args.guidance,
            sampler,
            width: args.width,
            height: args.height,
            noise: args.noise.as_deref().map(load_noise).transpose()?,
            step_noise: None,
        },
        replace_steps: args.replace_steps,
    };
    // The settings' errors come before any note of what is about to be written.
    let rows = if used.is_empty() { 2 } else { 4 };
    sd.check_generate(&opts.generate, rows)?;
    if let Some(note) = note {
        job.note(note);
    }
    if random {
        eprintln!("seed {seed}");
    }
    let maps = args.maps.as_ref().map(|_| AttentionMaps::new(true));
    for (i, out) in outs.iter().enumerate() {
        opts.generate.seed = seed.wrapping_add(i as u64);
        let g = generate_pair(&sd, &concepts, &args.prompt, &opts, maps.as_ref(), job)?;
        for p in g.save(out)? {
            crate::app::stdout::line(p.display())?;
        }
    }
    if let (Some(m), Some(path)) = (&maps, &args.maps) {
        m.save(path)?;
        crate::app::stdout::line(path.display())?;
    }
    Ok(())
}

fn train(global: &GlobalArgs, args: &TrainArgs, job: &Job, signals: &Signals) -> Result<ExitCode> {
    let sd = load_model(global, job)?;
    let mut settings = method_settings(&args.set)?;
    if let Some(rank) = args.rank {
        settings.insert("rank".into(), rank.into());
    }
    if let Some(trigger) = &args.trigger {
        settings.insert("trigger".into(), trigger.clone().into());
    }
    let mut req = actions::TrainAsk {
        folder: args.folder.clone(),
        name: args.name.clone(),
        word: args.word.clone(),
        method: args.method.clone(),
        settings,
        steps: args.train_steps,
        lr: args.lr,
        batch: args.batch,
        micro_batch: args.micro_batch,
        seed: args.seed,
        templates: (!args.templates.is_empty()).then(|| args.templates.clone()),
        flip: args.no_flip.then_some(false),
        checkpoint_every: args.checkpoint_every,
        checkpoint_dir: None,
        masks: args.masks.clone(),
        prior: args.prior.then(|| Prior {
            images: args.prior_images,
            weight: args.prior_weight,
            dir: args.prior_dir.clone(),
        }),
        resume: args.resume.clone(),
        out: args.out.clone(),
        save_f32: args.f32,
    }
    .resolve()?;
    // The command line always saves: by default where the method's files go.
    let out = req
        .out
        .get_or_insert_with(|| req.method.default_out(&req.name))
        .clone();
    let model_files = global.input_paths();
    let model_refs: Vec<&Path> = model_files.iter().map(PathBuf::as_path).collect();
    crate::util::fs::check_not_an_input(&[&out], &model_refs)?;
    let t = actions::train_concept(&sd, &req, job)?;
    let saved = t.saved.clone().unwrap_or(out);
    match t.end {
        TrainEnd::Finished => {
            if let Some(l) = t.losses.last() {
                eprintln!("step {}: loss {l:.5}", t.steps_done);
            }
            crate::app::stdout::line(saved.display())?;
            Ok(ExitCode::SUCCESS)
        }
        // Stopped by Ctrl-C or SIGTERM: saved, and the exit status says it did not finish.
        TrainEnd::Cancelled => {
            eprintln!(
                "stopped at step {} of {}: what was learned is saved in {}",
                t.steps_done,
                req.options.steps,
                saved.display()
            );
            Ok(signals.stop_status())
        }
        TrainEnd::Failed(e) => {
            eprintln!(
                "what step {} reached is saved in {}",
                t.steps_done,
                saved.display()
            );
            Err(e)
        }
    }
}

fn compare(global: &GlobalArgs, args: &CompareArgs, job: &Job) -> Result<()> {
    let mut settings: std::collections::BTreeMap<String, crate::methods::Settings> =
        Default::default();
    for s in &args.set {
        let (method, kv) = s.split_once('.').ok_or_else(|| {
            Error::arg("set", format!("{s:?}: METHOD.KEY=VALUE (e.g. lora.rank=8)"))
        })?;
        crate::methods::method(method)?;
        let one = match kv.split_once('=') {
            // Every method's training lr and batch, besides its own options.
            Some((k @ ("lr" | "batch" | "prior" | "prior_images" | "prior_weight"), v)) => {
                let bad = || Error::arg("set", format!("{s:?}: {k} is not {v:?}"));
                let v = match k {
                    "prior" => serde_json::json!(v.parse::<bool>().map_err(|_| bad())?),
                    "batch" | "prior_images" => {
                        serde_json::json!(v.parse::<u64>().map_err(|_| bad())?)
                    }
                    _ => serde_json::json!(v.parse::<f64>().map_err(|_| bad())?),
                };
                crate::methods::Settings::from([(k.to_string(), v)])
            }
            _ => method_settings(&[kv.to_string()])?,
        };
        settings.entry(method.to_string()).or_default().extend(one);
    }
    let d = CompareOptions::default();
    let ask = actions::CompareAsk {
        data: args.data.clone(),
        name: args.name.clone(),
        word: args.word.clone(),
        options: CompareOptions {
            methods: if args.methods.is_empty() {
                d.methods
            } else {
                args.methods.clone()
            },
            settings,
            checkpoints: args.checkpoints.clone(),
            samples: args.samples,
            w2_prompts: args.w2_prompts,
            fisher_samples: args.fisher_samples.unwrap_or(args.samples),
            fisher_prompts: args
                .fisher_prompts
                .unwrap_or(args.fisher_samples.unwrap_or(args.samples)),
            captions: args.captions.clone(),
            prompts: args.prompts,
            prompt_chunk: args.prompt_chunk,
            images_per_prompt: args.images_per_prompt,
            steps: args.steps,
            guidance: args.guidance,
            seed: args.seed,
        },
        clip: args.clip.clone(),
        dino: args.dino.clone(),
        out: args.out.clone(),
        shard: args.shard.clone(),
        shard_count: args.shard_count,
        merge: args.merge,
    };
    let sd = load_model(global, job)?;
    let done = actions::compare(&sd, &ask, job)?;
    eprintln!(
        "{} cells measured, {} already there",
        done.run.cells_done, done.run.cells_skipped
    );
    if let Some(m) = &done.merged {
        if !m.missing.is_empty() {
            eprintln!(
                "{} cells missing (not measured yet), e.g. {}",
                m.missing.len(),
                m.missing[0].display()
            );
        }
        crate::app::stdout::line(m.csv.display())?;
        crate::app::stdout::line(m.table.display())?;
        for (p, _) in &m.charts {
            crate::app::stdout::line(p.display())?;
        }
    }
    Ok(())
}

fn bench(global: &GlobalArgs, args: &BenchArgs, job: &Job) -> Result<()> {
    let (sd, name) = match args.shapes.as_str() {
        "model" => {
            let name = global
                .model
                .clone()
                .unwrap_or_else(|| "bundled tiny model".into());
            (load_model(global, job)?, name)
        }
        "sd15" => {
            let opts = LoadOptions {
                device: parse_device(&global.device)?,
                dtype: parse_dtype(&global.dtype)?,
                kernels: global.kernels,
                vocabulary: Some(crate::assets::clip_tokenizer()),
                ..LoadOptions::default()
            };
            let sd = StableDiffusion::random(&ModelConfigs::sd15(), &opts, 0)?;
            (sd, "SD1.5 shapes, random weights".to_string())
        }
        other => {
            return Err(Error::arg(
                "--shapes",
                format!("`{other}`: expected model or sd15"),
            ))
        }
    };
    let opts = BenchOptions {
        steps: args.steps,
        repeats: args.repeats,
        only: args.only.clone(),
        micro_batch: args.micro_batch,
    };
    let quiet = Job::quiet();
    let reload = || load_model(global, &quiet);
    let reload: Option<crate::app::bench::Reload<'_>> = (args.shapes == "model").then_some(&reload);
    // Each row is printed, and the JSON rewritten, as soon as it is measured.
    crate::app::bench::run(&sd, &name, &opts, reload, job, &mut |report| {
        if report.rows.len() == 1 {
            crate::app::stdout::print(&report.header())?;
        }
        if let Some(row) = report.rows.last() {
            crate::app::stdout::print(&row.line())?;
        }
        if let Some(path) = &args.json {
            let json = serde_json::to_string_pretty(report)
                .map_err(|e| Error::Internal(format!("the report as JSON: {e}")))?;
            crate::util::fs::write_atomic(path, |w| {
                w.write_all(json.as_bytes()).map_err(|e| Error::io(path, e))
            })?;
        }
        Ok(())
    })?;
    Ok(())
}

/// The command a mistyped word most likely meant: a prefix of one, or one edit or two away.
fn nearest_command(word: &str) -> Option<String> {
    fn distance(a: &str, b: &str) -> usize {
        let b: Vec<char> = b.chars().collect();
        let mut row: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.chars().enumerate() {
            let mut prev = row[0];
            row[0] = i + 1;
            for (j, &cb) in b.iter().enumerate() {
                let cur = row[j + 1];
                row[j + 1] = (prev + usize::from(ca != cb)).min(row[j] + 1).min(cur + 1);
                prev = cur;
            }
        }
        row[b.len()]
    }
    if word.contains('.') || word.contains('/') || word.len() < 2 {
        return None;
    }
    subcommands()
        .into_iter()
        .filter(|c| c != "help")
        .map(|c| (c.starts_with(word), distance(word, &c), c))
        .filter(|&(prefix, d, _)| prefix || d <= 2)
        .min_by_key(|&(prefix, d, _)| (!prefix, d))
        .map(|(_, _, c)| c)
}

/// What to say of a first word that is neither a command nor an existing file: the command
/// it looks like, a prompt given without `generate`, or a recipe file that is not there.
fn missing_script(word: &Path) -> String {
    let text = word.to_string_lossy();
    if let Some(cmd) = nearest_command(&text) {
        return format!("`{text}` is neither a file nor a command: did you mean `{cmd}`?");
    }
    let is_recipe = word.extension().is_some_and(|e| e == "rhai");
    if is_recipe || text.contains('/') {
        return format!("{text}: no such recipe file");
    }
    format!(
        "`{text}` is neither a recipe file nor a command (generate, train, bench): to make an \
         image of it, `infusion-repl generate {}`",
        if text.contains(char::is_whitespace) {
            format!("{text:?}")
        } else {
            text.to_string()
        }
    )
}

/// A generation's seed: a whole number from 0, or -1 for a random one.
fn parse_gen_seed(s: &str) -> std::result::Result<i64, String> {
    match s.parse::<i64>() {
        Ok(n) if n >= -1 => Ok(n),
        _ => Err(format!(
            "`{s}` is not a seed: seeds are whole numbers from 0, or -1 for a random one"
        )),
    }
}

/// A seed: a whole number from 0 (a negative one is named as such, not taken for a flag).
fn parse_seed(s: &str) -> std::result::Result<u64, String> {
    s.parse().map_err(|_| {
        format!(
            "`{s}` is not a seed: seeds are whole numbers from 0 to {}",
            u64::MAX
        )
    })
}

/// Runs the command line; returns the process exit code.
pub fn run(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let args: Vec<OsString> = args.into_iter().collect();
    // A recipe gets everything after its file; help asked for before it is the tool's.
    let script_mode = first_positional(&args).is_some_and(|i| {
        !subcommands().contains(&args[i].to_string_lossy().into_owned())
            && !args[1..i]
                .iter()
                .any(|a| matches!(a.to_str(), Some("-h" | "--help" | "-V" | "--version")))
    });
    let parsed = if script_mode {
        ScriptCli::try_parse_from(&args).map(|c| (c.global, None, Some((c.script, c.args))))
    } else {
        Cli::try_parse_from(&args).map(|c| (c.global, c.command, None))
    };
    let (global, command, script) = match parsed {
        Ok(p) => p,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let session = Session::new(ScriptConfig {
        model: global.model_request(),
        no_images: global.no_images,
        limits: crate::app::script::ScriptLimits {
            scale: global.script_limits,
        },
        interactive: command.is_none() && script.is_none(),
        ..ScriptConfig::default()
    });
    let job = session.job.clone();
    let signals = Signals::install(&job);
    let result = match (command, script) {
        (Some(Command::Generate(args)), _) => {
            generate(&global, &args, &job).map(|()| ExitCode::SUCCESS)
        }
        (Some(Command::Train(args)), _) => train(&global, &args, &job, &signals),
        (Some(Command::Bench(args)), _) => bench(&global, &args, &job).map(|()| ExitCode::SUCCESS),
        (Some(Command::Compare(args)), _) => {
            compare(&global, &args, &job).map(|()| ExitCode::SUCCESS)
        }
        (None, Some((script, args))) => {
            if !script.exists() {
                eprintln!("error: {}", missing_script(&script));
                return ExitCode::from(2);
            }
            return match crate::app::script::run_file(&session, &script, &args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(RunError::Usage { text, help: true }) => {
                    crate::app::stdout::line_or_say(text);
                    ExitCode::SUCCESS
                }
                Err(RunError::Usage { text, help: false }) => {
                    eprintln!("{text}");
                    ExitCode::from(2)
                }
                Err(RunError::Failed(msg)) => {
                    eprintln!("{msg}");
                    if job.is_cancelled() {
                        // Stopped by a signal: the status says which.
                        signals.stop_status()
                    } else {
                        ExitCode::FAILURE
                    }
                }
            };
        }
        (None, None) => return crate::app::repl::run(session, &signals),
    };
    match result {
        Ok(code) => code,
        Err(Error::Cancelled) => {
            eprintln!("cancelled");
            signals.stop_status()
        }
        Err(e) => {
            eprintln!("error: {}", as_flags(e, &global));
            ExitCode::FAILURE
        }
    }
}

/// The library names options as scripts do (`replace_steps`); on the command line the same
/// option is a flag (`--replace-steps`), and the error says so. The library's `ema` (true or
/// false) is `--ema` or `--no-ema`, whichever `global` gave.
fn as_flags(e: Error, global: &GlobalArgs) -> Error {
    let Error::InvalidArgument { arg, msg } = e else {
        return e;
    };
    if arg == "ema" && global.no_ema {
        return Error::InvalidArgument {
            arg: "--no-ema".into(),
            msg,
        };
    }
    let cmd = Cli::command();
    let flag = std::iter::once(&cmd)
        .chain(cmd.get_subcommands())
        .flat_map(|c| c.get_arguments())
        .find(|a| a.get_id().as_str() == arg)
        .and_then(|a| a.get_long().map(|l| format!("--{l}")));
    Error::InvalidArgument {
        arg: flag.unwrap_or(arg),
        msg,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    /// A value clap accepts for `arg` (its default, else its first possible value, else any
    /// text).
    fn sample_value(arg: &clap::Arg) -> String {
        if let Some(d) = arg.get_default_values().first() {
            return d.to_string_lossy().into_owned();
        }
        arg.get_possible_values()
            .first()
            .map_or_else(|| "some-dir".to_string(), |v| v.get_name().to_string())
    }

    /// Issue 21, item 2: every option with a value, from clap's own definition, before the
    /// command leaves the command as the first positional word, and means the same there as
    /// after it.
    #[test]
    fn every_global_option_works_before_and_after_the_command() {
        let cli = Cli::command();
        let globals: Vec<&clap::Arg> = cli
            .get_arguments()
            .filter(|a| !a.is_positional() && a.get_action().takes_values())
            .collect();
        assert!(
            globals.len() >= 6,
            "model, device, dtype, config, vae, kernels"
        );
        // Issue 21, item 9: a misspelt option is the tool's error, not a recipe's usage.
        let typo = os(&["infusion-repl", "--modle", "x", "generate", "a cat"]);
        assert_eq!(first_positional(&typo), None);
        let e = Cli::try_parse_from(&typo).unwrap_err().to_string();
        assert!(e.contains("--modle") && e.contains("--model"), "{e}");
        for arg in globals {
            let flag = format!("--{}", arg.get_long().unwrap());
            let value = sample_value(arg);
            let before = os(&["infusion-repl", &flag, &value, "generate", "a cat"]);
            assert_eq!(first_positional(&before), Some(3), "{flag} before generate");
            let joined = format!("{flag}={value}");
            let before_joined = os(&["infusion-repl", &joined, "generate", "a cat"]);
            assert_eq!(first_positional(&before_joined), Some(2), "{joined}");
            let a = Cli::try_parse_from(&before).unwrap_or_else(|e| panic!("{flag}: {e}"));
            assert!(matches!(a.command, Some(Command::Generate(_))), "{flag}");
            // The model's options mean the same after the command (the REPL's and recipes'
            // own, like --script-limits, come before it only).
            if arg.is_global_set() {
                let after = os(&["infusion-repl", "generate", "a cat", &flag, &value]);
                let b = Cli::try_parse_from(&after).unwrap_or_else(|e| panic!("{flag}: {e}"));
                assert_eq!(
                    format!("{:?}", a.global),
                    format!("{:?}", b.global),
                    "{flag} means the same before and after the command"
                );
            }
            // A recipe too: the option is the tool's, the file is the script.
            let script = os(&["infusion-repl", &flag, &value, "my.rhai", "--x", "1"]);
            assert_eq!(first_positional(&script), Some(3), "{flag} before a recipe");
        }
    }

    /// Issue 21, item 6: `NAME=` names a concept; the rest is as before.
    #[test]
    fn concept_specs_take_a_name_a_word_a_trigger_and_a_scale() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pot.safetensors");
        std::fs::write(&file, b"x").unwrap();
        let odd = dir.path().join("a=b:c.safetensors");
        std::fs::write(&odd, b"x").unwrap();
        let p = file.display().to_string();
        let spec = |s: &str| concept_spec(Path::new(s), false);
        let r = spec(&p).unwrap();
        assert_eq!((r.path, r.name, r.word), (file.clone(), None, None));
        let r = spec(&format!("mypot={p}:teapot:sks:0.5")).unwrap();
        assert_eq!(r.path, file);
        assert_eq!(r.name.as_deref(), Some("mypot"));
        assert_eq!(r.word.as_deref(), Some("teapot"));
        assert_eq!(r.trigger.as_deref(), Some("sks"));
        assert_eq!(r.scale, Some(0.5));
        let r = spec(&format!("mypot={p}")).unwrap();
        assert_eq!((r.path, r.name.as_deref()), (file.clone(), Some("mypot")));
        let r = spec(&format!("{p}::sks")).unwrap();
        assert_eq!((r.word, r.trigger.as_deref()), (None, Some("sks")));
        // A file whose name has `=` and `:` is taken whole.
        let r = spec(&odd.display().to_string()).unwrap();
        assert_eq!((r.path, r.name), (odd, None));
        assert!(spec(&format!("{p}:a:b:1:2")).is_err());
        let e = spec(&format!("{p}:a:b:strong")).unwrap_err().to_string();
        assert!(e.contains("not a number"), "{e}");
    }

    /// Issue 21, item 9: every option of every command says what it does in `--help`.
    #[test]
    fn every_option_is_described() {
        let cli = Cli::command();
        for cmd in std::iter::once(&cli).chain(cli.get_subcommands()) {
            for arg in cmd.get_arguments().filter(|a| !a.is_hide_set()) {
                let id = arg.get_id().as_str();
                if matches!(id, "help" | "version") {
                    continue;
                }
                assert!(
                    arg.get_help().is_some() || arg.get_long_help().is_some(),
                    "`{} {id}` has no help text",
                    cmd.get_name()
                );
            }
        }
    }

    /// Issue 22: a method's own options on the command line are `--set KEY=VALUE`, typed by the
    /// method that declares them; an unknown key or a bad value is refused naming it.
    #[test]
    fn method_options_are_set_by_name() {
        let s = method_settings(&["rank=2".into(), "trigger=zwx".into()]).unwrap();
        assert_eq!(s["rank"], 2);
        assert_eq!(s["trigger"], "zwx");
        let e = method_settings(&["rank=two".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("rank is a count"), "{e}");
        let e = method_settings(&["nope=1".into()]).unwrap_err().to_string();
        assert!(e.contains("\"nope\" is no method's option"), "{e}");
        let e = method_settings(&["rank".into()]).unwrap_err().to_string();
        assert!(e.contains("KEY=VALUE"), "{e}");
        assert!(method_help().contains("--set rank=4"));
    }

    #[test]
    fn the_commands_come_from_clap() {
        let names = subcommands();
        for c in ["generate", "train", "bench", "help"] {
            assert!(names.contains(&c.to_string()), "{c} in {names:?}");
        }
        assert_eq!(nearest_command("genrate").as_deref(), Some("generate"));
        assert_eq!(nearest_command("my.rhai"), None);
        // Issue 21, item 9: a prompt given without its command says which.
        let e = missing_script(Path::new("a cat"));
        assert!(e.contains("infusion-repl generate \"a cat\""), "{e}");
        assert_eq!(
            missing_script(Path::new("my.rhai")),
            "my.rhai: no such recipe file"
        );
        assert!(missing_script(Path::new("tran")).contains("did you mean `train`"));
    }
}
