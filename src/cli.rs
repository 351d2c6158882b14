//! The `infusion-repl` command line.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use candle_core::{DType, Device};
use clap::{Args, Parser, Subcommand};

use crate::error::{Error, Result};
use crate::job::Job;
use crate::pipeline::{load_noise, GenerateOptions, LoadOptions, StableDiffusion};

#[derive(Debug, Parser)]
#[command(
    name = "infusion-repl",
    version,
    about = "Customize Stable Diffusion 1.5 with Infusion"
)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct GlobalArgs {
    /// Model folder (diffusers layout) or Hugging Face repo id; default: the bundled tiny model.
    #[arg(long, global = true, env = "INFUSION_MODEL")]
    model: Option<String>,
    /// cpu, cuda or cuda:N.
    #[arg(long, global = true, default_value = "cpu")]
    device: String,
    /// f32, f16 or bf16.
    #[arg(long, global = true, default_value = "f32")]
    dtype: String,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate an image from a prompt.
    Generate(GenerateArgs),
}

#[derive(Debug, Args)]
struct GenerateArgs {
    /// The prompt.
    #[arg(default_value = "a photo of a cat sitting by a teapot")]
    prompt: String,
    /// Where to write the PNG.
    #[arg(short, long, default_value = "image.png")]
    out: PathBuf,
    #[arg(long, default_value = "")]
    negative: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 50)]
    steps: usize,
    #[arg(long, default_value_t = 8.0)]
    guidance: f64,
    #[arg(long)]
    width: Option<usize>,
    #[arg(long)]
    height: Option<usize>,
    /// A safetensors file whose tensor `noise` is the initial latent.
    #[arg(long)]
    noise: Option<PathBuf>,
}

/// The tiny random-weight model shipped in the repository.
pub fn bundled_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models")
        .join("tiny-sd")
}

/// Parses `cpu`, `cuda`, `cuda:N`.
pub fn parse_device(s: &str) -> Result<Device> {
    let bad = || Error::arg("--device", format!("`{s}`: expected cpu, cuda or cuda:N"));
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" => cuda(0),
        _ => match s.strip_prefix("cuda:") {
            Some(n) => cuda(n.parse().map_err(|_| bad())?),
            None => Err(bad()),
        },
    }
}

fn cuda(ordinal: usize) -> Result<Device> {
    Device::new_cuda(ordinal).map_err(|e| {
        Error::arg(
            "--device",
            format!(
                "cannot open cuda:{ordinal}: {} (build with `--features cuda` for GPU support)",
                crate::weights::root_cause(&e)
            ),
        )
    })
}

/// Parses `f32`, `f16`, `bf16`.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        _ => Err(Error::arg(
            "--dtype",
            format!("`{s}`: expected f32, f16 or bf16"),
        )),
    }
}

fn load_model(global: &GlobalArgs) -> Result<StableDiffusion> {
    let opts = LoadOptions {
        device: parse_device(&global.device)?,
        dtype: parse_dtype(&global.dtype)?,
    };
    match &global.model {
        Some(spec) => StableDiffusion::load(spec, &opts),
        None => {
            let dir = bundled_model();
            eprintln!(
                "note: no --model given: using the bundled tiny model with random weights ({})",
                dir.display()
            );
            StableDiffusion::load_dir(&dir, &opts)
        }
    }
}

fn generate(global: &GlobalArgs, args: &GenerateArgs, job: &Job) -> Result<()> {
    let sd = load_model(global)?;
    let tokens = sd.tokenize(&args.prompt)?;
    if tokens.truncated() {
        eprintln!(
            "warning: the prompt has {} tokens, the text encoder takes {}: the end is cut off",
            tokens.untruncated_n_tokens,
            sd.tokenizer.max_len()
        );
    }
    let opts = GenerateOptions {
        negative_prompt: args.negative.clone(),
        seed: args.seed,
        steps: args.steps,
        guidance: args.guidance,
        width: args.width,
        height: args.height,
        noise: args.noise.as_deref().map(load_noise).transpose()?,
    };
    let generation = sd.generate(&args.prompt, &opts, job)?;
    generation.save_png(&args.out)?;
    println!("{}", args.out.display());
    Ok(())
}

/// Runs the command line; returns the process exit code.
pub fn run(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let job = Job::with_progress();
    let flag = job.cancel_flag();
    // Ctrl-C stops the running job at its next step; a second Ctrl-C while stopping is ignored.
    let _ = ctrlc::set_handler(move || flag.store(true, std::sync::atomic::Ordering::SeqCst));
    let result = match &cli.command {
        Command::Generate(args) => generate(&cli.global, args, &job),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Error::Cancelled) => {
            eprintln!("cancelled");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
