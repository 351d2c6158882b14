//! The `infusion-repl` command line.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, CommandFactory, Parser, Subcommand};

use crate::actions::{self, ModelRequest, TrainEnd, TrainRequest};
use crate::app::bench::BenchOptions;
use crate::app::script::{RunError, ScriptConfig, Session};
use crate::app::signals::Signals;
use crate::error::{Error, Result};
use crate::infusion::concept::ConceptSet;
use crate::infusion::generate::{generate_infusion, InfusionOptions};
use crate::infusion::maps::AttentionMaps;
use crate::job::Job;
use crate::sd::device::{parse_device, parse_dtype};
use crate::sd::fused::{set_kernels, Kernels};
use crate::sd::pipeline::{
    load_noise, GenerateOptions, LoadOptions, ModelConfigs, StableDiffusion,
};
use crate::sd::sampler::{SamplerKind, SamplerOptions};
use crate::train::TrainOptions;

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

const SUBCOMMANDS: &[&str] = &["generate", "train", "bench", "help"];

/// Index of the first argument that is neither an option nor an option's value.
fn first_positional(args: &[OsString]) -> Option<usize> {
    let mut i = 1;
    while i < args.len() {
        let a = args[i].to_string_lossy();
        if a == "--" {
            return (i + 1 < args.len()).then_some(i + 1);
        }
        if a.starts_with('-') {
            if matches!(a.as_ref(), "--model" | "--device" | "--dtype" | "--kernels") {
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
    /// naive (candle's composite ops) or fused (single-kernel attention and group norm + SiLU,
    /// used where nothing trains through them and no attention maps are asked for).
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
}

#[derive(Debug, Args)]
struct BenchArgs {
    /// `model`: the --model (default: the bundled tiny one); `sd15`: SD1.5's shapes with random
    /// weights.
    #[arg(long, default_value = "model")]
    shapes: String,
    #[arg(long, default_value_t = 50)]
    steps: usize,
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Also write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Only these groups of rows, comma-separated: load, unet, vae (text encoder and VAE
    /// decode), txt2img, pair, train, attention, groupnorm (load: a model from files, not
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
    /// Where to write the concept (default: NAME.safetensors).
    #[arg(short, long)]
    out: Option<PathBuf>,
    /// The method: infusion (the paper's), textual_inversion, lora (DreamBooth-LoRA),
    /// dreambooth (the whole UNet, written as a diffusers unet/ folder: NAME-unet by default).
    #[arg(long, default_value = "infusion", value_parser = actions::Method::NAMES)]
    method: String,
    /// LoRA: the rank of its factors.
    #[arg(long, default_value_t = 4)]
    rank: usize,
    /// LoRA and DreamBooth: the identifier prompts put before the class word.
    #[arg(long, default_value = "sks")]
    trigger: String,
    /// LoRA and DreamBooth: prior preservation, with class images the model makes of "a photo
    /// of a WORD".
    #[arg(long)]
    prior: bool,
    /// How many class images prior preservation makes (diffusers' default).
    #[arg(long, default_value_t = 100)]
    prior_images: usize,
    /// The weight of the class images' loss.
    #[arg(long, default_value_t = 1.0)]
    prior_weight: f64,
    /// Keep the class images in this folder and take them from it next time (diffusers'
    /// --class_data_dir); default: made each run.
    #[arg(long)]
    prior_dir: Option<PathBuf>,
    /// Training steps (in total, when resuming; default: 500, textual_inversion 3000).
    #[arg(long)]
    train_steps: Option<usize>,
    /// AdamW's learning rate (default: infusion 0.01, textual_inversion 5e-4 x batch, lora
    /// 1e-4, dreambooth 5e-6).
    #[arg(long)]
    lr: Option<f64>,
    /// Images per training step.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Seed of every random draw (a whole number from 0).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true, value_parser = parse_seed)]
    seed: u64,
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
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// The sampler, as diffusers' scheduler of that name: ddim (the paper's), dpmpp_2m
    /// (DPM-Solver++ 2M: as good in 20-25 steps), euler, euler_a (ancestral), pndm.
    #[arg(long, default_value = "ddim", value_parser = SamplerKind::NAMES)]
    scheduler: String,
    /// Karras sigmas (dpmpp_2m and euler).
    #[arg(long)]
    karras: bool,
    /// Classifier-free guidance scale.
    #[arg(long, default_value_t = 8.0)]
    guidance: f64,
    /// Image width in pixels (a multiple of 8; default: the model's size).
    #[arg(long)]
    width: Option<usize>,
    /// Image height in pixels (a multiple of 8; default: the model's size).
    #[arg(long)]
    height: Option<usize>,
    /// A safetensors file whose tensor `noise` is the initial latent.
    #[arg(long)]
    noise: Option<PathBuf>,
    /// A concept to load (repeat for several); prompts use them as `<name>`: an Infusion file,
    /// or `FILE:WORD[:TRIGGER[:SCALE]]` for a Textual Inversion or LoRA file or a DreamBooth
    /// unet/ folder (WORD: the class word the plain model sees in its place; TRIGGER: the
    /// identifier C's prompt puts before it, for a LoRA or DreamBooth; SCALE: a LoRA's
    /// strength, 1.0 by default).
    #[arg(long = "concept")]
    concepts: Vec<PathBuf>,
    /// Load concepts trained on another model anyway.
    #[arg(long)]
    force: bool,
    /// Fraction of the steps in which C uses F's attention maps.
    #[arg(long, default_value_t = 1.0)]
    replace_steps: f64,
    /// Write the cross-attention maps of F and C (every step) to this safetensors file.
    #[arg(long)]
    maps: Option<PathBuf>,
}

/// `FILE` or `FILE:WORD[:TRIGGER[:SCALE]]` (a path that exists as given is taken whole, colons
/// and all; an empty TRIGGER is none: `pot.safetensors:teapot::0.8`).
fn concept_spec(spec: &Path, force: bool) -> Result<actions::ConceptRequest> {
    let mut req = actions::ConceptRequest {
        path: spec.to_path_buf(),
        force,
        ..Default::default()
    };
    let text = spec.to_string_lossy();
    if spec.exists() {
        return Ok(req);
    }
    let parts: Vec<&str> = text.split(':').collect();
    let Some(k) = (1..parts.len()).find(|&k| Path::new(&parts[..k].join(":")).exists()) else {
        return Ok(req); // not there: load_concept says so
    };
    let extra = &parts[k..];
    if extra.len() > 3 || extra[0].is_empty() {
        return Err(Error::arg(
            "concept",
            format!("{text:?}: give FILE, or FILE:WORD[:TRIGGER[:SCALE]]"),
        ));
    }
    req.path = PathBuf::from(parts[..k].join(":"));
    req.word = Some(extra[0].to_string());
    req.trigger = extra
        .get(1)
        .filter(|t| !t.is_empty())
        .map(|t| t.to_string());
    if let Some(scale) = extra.get(2) {
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

/// Where a generation's `n` images go: `-o` as given (replaced if there), else the first of
/// image.png, image-1.png, ... whose files are all new, with a note when that is not image.png.
fn outputs(out: Option<&Path>, n: usize, job: &Job) -> Vec<PathBuf> {
    if let Some(out) = out {
        return numbered(out, n);
    }
    let base = |k: usize| {
        PathBuf::from(if k == 0 {
            "image.png".to_string()
        } else {
            format!("image-{k}.png")
        })
    };
    let k = (0..10_000)
        .find(|&k| numbered(&base(k), n).iter().all(|p| !p.exists()))
        .unwrap_or(0);
    if k > 0 {
        job.note(format!(
            "image.png exists: writing {} (give -o to choose the file)",
            base(k).display()
        ));
    }
    numbered(&base(k), n)
}

fn generate(global: &GlobalArgs, args: &GenerateArgs, job: &Job) -> Result<()> {
    if args.n == 0 {
        return Err(Error::arg("n", "must be at least 1"));
    }
    if args.n > 1 && args.maps.is_some() {
        return Err(Error::arg(
            "maps",
            "writes the maps of one image: use it without --images",
        ));
    }
    let sampler = SamplerOptions::parse(&args.scheduler, args.karras)?;
    let outs = outputs(args.out.as_deref(), args.n, job);
    // Where the images go is checked before the work, not found wrong after it.
    for path in outs.iter().chain(&args.maps) {
        crate::util::fs::check_writable(path)?;
    }
    let sd = load_model(global, job)?;
    let mut concepts = ConceptSet::new();
    for spec in &args.concepts {
        let req = concept_spec(spec, args.force)?;
        let path = req.path.clone();
        let (name, word) = match actions::load_concept(&req, Some(&sd), &mut concepts, job)? {
            actions::LoadedConcept::Infusion(c) => (c.name.clone(), c.word.clone()),
            actions::LoadedConcept::Adapted(a) => (a.name.clone(), a.word.clone()),
        };
        eprintln!("loaded <{name}> ({word}) from {}", path.display());
    }
    let used = concepts.parse(&args.prompt)?.marks;
    for c in concepts
        .iter()
        .filter(|c| !used.iter().any(|m| m.name == c.name))
    {
        job.warn(format!(
            "<{}> is loaded but the prompt does not use it (write <{}> where it goes)",
            c.name, c.name
        ));
    }
    let seed = match u64::try_from(args.seed) {
        Ok(s) => s,
        Err(_) => {
            let s = u64::from(rand::random::<u32>());
            eprintln!("seed {s}");
            s
        }
    };
    let mut opts = InfusionOptions {
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
    let maps = args.maps.as_ref().map(|_| AttentionMaps::new(true));
    for (i, out) in outs.iter().enumerate() {
        opts.generate.seed = seed.wrapping_add(i as u64);
        let g = generate_infusion(&sd, &concepts, &args.prompt, &opts, maps.as_ref(), job)?;
        for p in g.save(out)? {
            println!("{}", p.display());
        }
    }
    if let (Some(m), Some(path)) = (&maps, &args.maps) {
        m.save(path)?;
        println!("{}", path.display());
    }
    Ok(())
}

fn train(global: &GlobalArgs, args: &TrainArgs, job: &Job, signals: &Signals) -> Result<ExitCode> {
    let sd = load_model(global, job)?;
    let defaults = TrainOptions::default();
    let mut method = actions::Method::parse(&args.method, args.rank, &args.trigger)?;
    let mut steps = method.default_steps();
    if let Some(path) = &args.resume {
        let (m, ckpt) = actions::resumed_method(path, &method)?;
        (method, steps) = (m, ckpt.options.steps);
    }
    let out = args.out.clone().unwrap_or_else(|| match method {
        actions::Method::DreamBooth { .. } => PathBuf::from(format!("{}-unet", args.name)),
        _ => PathBuf::from(format!("{}.safetensors", args.name)),
    });
    let req = TrainRequest {
        folder: args.folder.clone(),
        name: args.name.clone(),
        word: args.word.clone(),
        options: TrainOptions {
            steps: args.train_steps.unwrap_or(steps),
            lr: args.lr.unwrap_or(method.default_lr(args.batch)),
            batch: args.batch,
            seed: args.seed,
            templates: if args.templates.is_empty() {
                defaults.templates
            } else {
                args.templates.clone()
            },
            flip: !args.no_flip,
            checkpoint_every: args.checkpoint_every,
            ..defaults
        },
        method,
        prior: args.prior.then_some(actions::Prior {
            images: args.prior_images,
            weight: args.prior_weight,
            dir: args.prior_dir.clone(),
        }),
        resume: args.resume.clone(),
        out: Some(out.clone()),
        save_f32: args.f32,
    };
    let t = actions::train_concept(&sd, &req, job)?;
    let saved = t.saved.clone().unwrap_or(out);
    match t.end {
        TrainEnd::Finished => {
            if let Some(l) = t.losses.last() {
                eprintln!("step {}: loss {l:.5}", t.steps_done);
            }
            println!("{}", saved.display());
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
                "the deltas of step {} are saved in {}",
                t.steps_done,
                saved.display()
            );
            Err(e)
        }
    }
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
                ..LoadOptions::default()
            };
            let sd = StableDiffusion::random(
                &ModelConfigs::sd15(),
                &crate::assets::clip_tokenizer(),
                &opts,
                0,
            )?;
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
    };
    let quiet = Job::quiet();
    let reload = || load_model(global, &quiet);
    let reload: Option<crate::app::bench::Reload<'_>> = (args.shapes == "model").then_some(&reload);
    // Each row is printed, and the JSON rewritten, as soon as it is measured.
    crate::app::bench::run(&sd, &name, &opts, reload, job, &mut |report| {
        if report.rows.len() == 1 {
            print!("{}", report.header());
        }
        if let Some(row) = report.rows.last() {
            print!("{}", row.line());
        }
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        if let Some(path) = &args.json {
            let json = serde_json::to_string_pretty(report).map_err(|e| Error::arg("json", e))?;
            crate::util::fs::write_atomic(path, |w| {
                w.write_all(json.as_bytes()).map_err(|e| Error::io(path, e))
            })?;
        }
        Ok(())
    })?;
    Ok(())
}

/// The command a mistyped word most likely meant: a prefix of one, or one edit or two away.
fn nearest_command(word: &str) -> Option<&'static str> {
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
    SUBCOMMANDS
        .iter()
        .filter(|c| **c != "help")
        .map(|c| (c.starts_with(word), distance(word, c), *c))
        .filter(|&(prefix, d, _)| prefix || d <= 2)
        .min_by_key(|&(prefix, d, _)| (!prefix, d))
        .map(|(_, _, c)| c)
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
        !SUBCOMMANDS.contains(&args[i].to_string_lossy().as_ref())
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
    set_kernels(global.kernels);
    let session = Session::new(ScriptConfig {
        model: global.model_request(),
        no_images: global.no_images,
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
        (None, Some((script, args))) => {
            if !script.exists() {
                if let Some(cmd) = nearest_command(&script.to_string_lossy()) {
                    eprintln!(
                        "error: `{}` is neither a file nor a command: did you mean `{cmd}`?",
                        script.display()
                    );
                    return ExitCode::from(2);
                }
            }
            return match crate::app::script::run_file(&session, &script, &args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(RunError::Usage { text, help: true }) => {
                    println!("{text}");
                    ExitCode::SUCCESS
                }
                Err(RunError::Usage { text, help: false }) => {
                    eprintln!("{text}");
                    ExitCode::from(2)
                }
                Err(RunError::Failed(msg)) => {
                    eprintln!("{msg}");
                    ExitCode::FAILURE
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
            eprintln!("error: {}", as_flags(e));
            ExitCode::FAILURE
        }
    }
}

/// The library names options as scripts do (`replace_steps`); on the command line the same
/// option is a flag (`--replace-steps`), and the error says so.
fn as_flags(e: Error) -> Error {
    let Error::InvalidArgument { arg, msg } = e else {
        return e;
    };
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
