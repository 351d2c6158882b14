//! Over-training curves (the paper's figures 10 and 11): train a concept and, at chosen steps,
//! measure both overfitting metrics and the three scores; written as CSV and drawn as a chart.

use std::path::PathBuf;

use candle_core::Tensor;
use image::RgbImage;
use serde::Serialize;

use super::chart::line_chart;
use super::clip::Clip;
use super::dino::Dino;
use super::fisher::{fisher_divergence, FisherOptions, Variant};
use super::scores::{clip_i, clip_t, dino_i};
use super::w2::wasserstein;
use crate::error::{Error, Result};
use crate::util::fs::write_atomic;
use crate::util::image_io::{grid_on, save_png, tensor_to_rgb};
use crate::infusion::concept::ConceptSet;
use crate::infusion::generate::{generate_infusion, InfusionOptions};
use crate::job::Job;
use crate::sd::pipeline::{GenerateOptions, StableDiffusion};
use crate::infusion::train::{TrainOptions, Trainer};

#[derive(Debug, Clone)]
pub struct CurveOptions {
    /// Training steps at which to measure (ascending; 0 measures the untrained concept).
    pub checkpoints: Vec<usize>,
    pub train: TrainOptions,
    /// Prompts without the concept, for the Fisher divergence.
    pub fisher_prompts: Vec<String>,
    pub fisher_samples: usize,
    /// Images per side for W2: base "a photo of a WORD" vs customized "a photo of a <NAME>",
    /// seeds 0..n.
    pub w2_samples: usize,
    /// Average-pool latents by this factor before W2.
    pub w2_pool: Option<usize>,
    /// Prompts with `{}` for the concept, scored with CLIP-T, CLIP-I and DINO-I.
    pub eval_prompts: Vec<String>,
    pub images_per_prompt: usize,
    pub steps: usize,
    pub guidance: f64,
    pub out_dir: PathBuf,
}

impl Default for CurveOptions {
    fn default() -> Self {
        Self {
            checkpoints: vec![100, 200, 400, 1000, 2000],
            train: TrainOptions::default(),
            fisher_prompts: vec![
                "a photo of a dog".into(),
                "a painting of a lighthouse".into(),
                "a city street at night".into(),
                "a bowl of fruit on a table".into(),
            ],
            fisher_samples: 32,
            w2_samples: 16,
            w2_pool: None,
            eval_prompts: vec!["a {} in the snow".into(), "a {} on the beach".into()],
            images_per_prompt: 2,
            steps: 50,
            guidance: 8.0,
            out_dir: PathBuf::from("curves"),
        }
    }
}

/// The measurements at one training step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CurvePoint {
    pub step: usize,
    pub fisher: f64,
    pub fisher_std_err: f64,
    pub w2: f64,
    pub clip_t: f64,
    pub clip_i: f64,
    pub dino_i: f64,
}

#[derive(Debug, Clone)]
pub struct Curves {
    pub points: Vec<CurvePoint>,
    pub csv: PathBuf,
    pub chart: PathBuf,
    pub chart_image: RgbImage,
}

/// The chart of the five series, one panel each.
pub fn chart(points: &[CurvePoint]) -> Result<RgbImage> {
    let xs: Vec<f64> = points.iter().map(|p| p.step as f64).collect();
    type Series = (&'static str, fn(&CurvePoint) -> f64);
    let series: [Series; 5] = [
        ("latent Fisher divergence", |p| p.fisher),
        ("W2 (latents)", |p| p.w2),
        ("CLIP-T", |p| p.clip_t),
        ("CLIP-I", |p| p.clip_i),
        ("DINO-I", |p| p.dino_i),
    ];
    let panels: Vec<RgbImage> = series
        .iter()
        .map(|(t, f)| line_chart(t, &xs, &points.iter().map(f).collect::<Vec<_>>(), 300, 180))
        .collect();
    grid_on(&panels, 3, image::Rgb([255, 255, 255]))
}

/// Trains `name` (class word `word`) on `images` and measures at every checkpoint.
#[allow(clippy::too_many_arguments)]
pub fn overtraining_curves(
    sd: &StableDiffusion,
    clip: &Clip,
    dino: &Dino,
    images: &[RgbImage],
    name: &str,
    word: &str,
    opts: &CurveOptions,
    job: &Job,
) -> Result<Curves> {
    let mut checkpoints = opts.checkpoints.clone();
    checkpoints.sort_unstable();
    checkpoints.dedup();
    if checkpoints.is_empty() {
        return Err(Error::arg("checkpoints", "no training steps to measure at"));
    }
    if opts.w2_samples < 2 {
        return Err(Error::arg(
            "w2_samples",
            "W2 needs at least 2 images per side",
        ));
    }
    std::fs::create_dir_all(&opts.out_dir).map_err(|e| Error::io(&opts.out_dir, e))?;
    let mut trainer = Trainer::new(sd, name, word, images, opts.train.clone())?;
    let gen = |seed: u64| GenerateOptions {
        seed,
        steps: opts.steps,
        guidance: opts.guidance,
        ..Default::default()
    };
    let mut points = vec![];
    for &step in &checkpoints {
        trainer.set_total_steps(step);
        let report = trainer.run(job)?;
        if report.cancelled {
            return Err(Error::Cancelled);
        }
        let concept = trainer.concept()?;
        concept.save(
            &opts
                .out_dir
                .join(format!("{name}-step{step:06}.safetensors")),
            candle_core::DType::F16,
        )?;
        let mut set = ConceptSet::new();
        set.insert(concept, false);

        let fisher = fisher_divergence(
            sd,
            &Variant::Base,
            &Variant::Concepts(&set),
            &opts.fisher_prompts,
            &FisherOptions {
                samples: opts.fisher_samples,
                gen_steps: opts.steps.min(25),
                ..Default::default()
            },
            job,
        )?;

        let w2_prompt = format!("a photo of a <{name}>");
        let (mut base, mut custom) = (vec![], vec![]);
        for s in 0..opts.w2_samples {
            let io = InfusionOptions {
                generate: gen(s as u64),
                replace_steps: 1.0,
            };
            let g = generate_infusion(sd, &set, &w2_prompt, &io, None, job)?;
            base.push(g.base_latents);
            custom.push(g.custom_latents);
        }
        let w2 = wasserstein(
            &Tensor::cat(&base, 0)?,
            &Tensor::cat(&custom, 0)?,
            opts.w2_pool,
        )?;

        let (mut generated, mut prompts) = (vec![], vec![]);
        for p in &opts.eval_prompts {
            for s in 0..opts.images_per_prompt {
                let io = InfusionOptions {
                    generate: gen(1000 + s as u64),
                    replace_steps: 1.0,
                };
                let g = generate_infusion(
                    sd,
                    &set,
                    &p.replace("{}", &format!("<{name}>")),
                    &io,
                    None,
                    job,
                )?;
                generated.push(tensor_to_rgb(&g.custom_image)?);
                prompts.push(g.parsed.base.clone());
            }
        }
        let prompt_refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
        points.push(CurvePoint {
            step,
            fisher: fisher.mean,
            fisher_std_err: fisher.std_err,
            w2: w2.w2,
            clip_t: clip_t(clip, &generated, &prompt_refs)?,
            clip_i: clip_i(clip, &generated, images)?,
            dino_i: dino_i(dino, &generated, images)?,
        });
    }
    let csv = opts.out_dir.join(format!("{name}-curves.csv"));
    let mut w = csv::Writer::from_writer(vec![]);
    for p in &points {
        w.serialize(p).map_err(|e| Error::config(&csv, e))?;
    }
    let bytes = w
        .into_inner()
        .map_err(|e| Error::config(&csv, e.to_string()))?;
    write_atomic(&csv, |out| {
        out.write_all(&bytes).map_err(|e| Error::io(&csv, e))
    })?;
    let chart_image = chart(&points)?;
    let chart_path = opts.out_dir.join(format!("{name}-curves.png"));
    save_png(&chart_image, &chart_path, &[("concept", name.to_string())])?;
    Ok(Curves {
        points,
        csv,
        chart: chart_path,
        chart_image,
    })
}
