//! Over-training curves (the paper's figures 10 and 11): train a concept and, at chosen steps,
//! measure both overfitting metrics and the three scores; written as CSV and drawn as a chart.

use std::path::PathBuf;

use candle_core::Tensor;
use image::RgbImage;
use serde::Serialize;

use super::clip::Clip;
use super::dino::Dino;
use super::fisher::{fisher_divergence, FisherOptions, Variant};
use super::scores::{clip_i, clip_t, dino_i};
use super::w2::wasserstein;
use crate::customize::generate::{generate_pair, PairGeneration, PairOptions};
use crate::customize::set::ConceptSet;
use crate::error::{Error, Result};
use crate::infusion::concept::Concept;
use crate::job::Job;
use crate::sd::device::ensure_fits;
use crate::sd::pipeline::{GenerateOptions, StableDiffusion};
use crate::train::TrainOptions;
use crate::util::fs::write_csv;
use crate::util::image_io::{grid_on, save_png, tensor_to_rgb};
use crate::util::plot::{line_chart, Line, PALETTE};

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
    /// The CLIP and DINO the scores come from.
    pub scorers: String,
}

#[derive(Debug, Clone)]
pub struct Curves {
    pub points: Vec<CurvePoint>,
    pub csv: PathBuf,
    pub chart: PathBuf,
    pub chart_image: RgbImage,
}

/// The chart of the five series, one panel each (360 x 240), with ticks and titles on both
/// axes and the Fisher divergence's standard error as error bars; the sixth cell names the CLIP
/// and DINO the scores come from, and says in red when their weights are random (the scores
/// then mean nothing: the chart says so, as the CSV does).
pub fn chart(points: &[CurvePoint]) -> Result<RgbImage> {
    type Series = (
        &'static str,
        &'static str,
        fn(&CurvePoint) -> (f64, Option<f64>),
    );
    let series: [Series; 5] = [
        ("latent Fisher divergence", "Fisher", |p| {
            (p.fisher, Some(p.fisher_std_err))
        }),
        ("W2 of the latents", "W2", |p| (p.w2, None)),
        ("CLIP-T", "CLIP-T", |p| (p.clip_t, None)),
        ("CLIP-I", "CLIP-I", |p| (p.clip_i, None)),
        ("DINO-I", "DINO-I", |p| (p.dino_i, None)),
    ];
    let scorers = points.first().map_or("", |p| p.scorers.as_str());
    let random = random_scorers(scorers);
    let mut panels = series
        .iter()
        .map(|(title, y, f)| {
            let line = Line {
                label: String::new(),
                color: PALETTE[0],
                points: points
                    .iter()
                    .map(|p| {
                        let (v, e) = f(p);
                        (p.step as f64, v, e)
                    })
                    .collect(),
            };
            let title = match random.iter().find(|k| title.starts_with(**k)) {
                Some(kind) => format!("{title} (RANDOM {kind})"),
                None => title.to_string(),
            };
            line_chart(&[line], (&title, "training step", y), (360, 240))
        })
        .collect::<Result<Vec<RgbImage>>>()?;
    panels.push(scorers_note(scorers, &random, (360, 240)));
    grid_on(&panels, 3, image::Rgb([255, 255, 255]))
}

/// Which of the scorers a points' `scorers` label (`CLIP name (RANDOM weights), DINO name`)
/// marks as having random weights.
fn random_scorers(scorers: &str) -> Vec<&'static str> {
    ["CLIP", "DINO"]
        .into_iter()
        .filter(|kind| {
            scorers
                .split(", ")
                .any(|s| s.starts_with(kind) && s.contains("RANDOM"))
        })
        .collect()
}

/// A white `size` panel naming the scorers, and, in red, what random ones mean.
fn scorers_note(scorers: &str, random: &[&str], (w, h): (u32, u32)) -> RgbImage {
    use crate::util::text_render::{draw_text, measure, wrap};
    let mut img = RgbImage::from_pixel(w, h, image::Rgb([255, 255, 255]));
    let px = 14.0;
    let line_h = measure("Ag", px).1.ceil() as i32 + 3;
    let width = w as f32 - 40.0;
    let mut y = 30;
    let say = |img: &mut RgbImage, text: &str, color: image::Rgb<u8>, y: &mut i32| {
        for l in wrap(text, width, px) {
            if *y + line_h <= h as i32 {
                draw_text(img, &l, 20, *y, px, color);
            }
            *y += line_h;
        }
    };
    let ink = image::Rgb([20, 20, 20]);
    if scorers.is_empty() {
        return img;
    }
    say(&mut img, &format!("Scored with {scorers}."), ink, &mut y);
    if !random.is_empty() {
        y += line_h / 2;
        let (who, scores) = match random {
            [k] if *k == "CLIP" => ("The CLIP has", "CLIP-T and CLIP-I"),
            [_] => ("The DINO has", "DINO-I"),
            _ => ("The CLIP and the DINO have", "CLIP-T, CLIP-I and DINO-I"),
        };
        say(
            &mut img,
            &format!("{who} RANDOM weights: {scores} mean nothing here. Score with real ones."),
            image::Rgb([200, 0, 0]),
            &mut y,
        );
    }
    img
}

/// What a checkpoint is measured with.
struct Measure<'a> {
    sd: &'a StableDiffusion,
    clip: &'a Clip,
    dino: &'a Dino,
    /// The training images (CLIP-I and DINO-I's references).
    images: &'a [RgbImage],
    opts: &'a CurveOptions,
    job: &'a Job,
    /// The scorers' labels, recorded at every point.
    scorers: String,
}

impl Measure<'_> {
    fn generate(&self, set: &ConceptSet, prompt: &str, seed: u64) -> Result<PairGeneration> {
        let io = PairOptions::from(GenerateOptions {
            seed,
            steps: self.opts.steps,
            guidance: self.opts.guidance,
            ..Default::default()
        });
        generate_pair(self.sd, set, prompt, &io, None, self.job)
    }

    /// W2 between the base and customized latents of "a photo of a <NAME>", seeds 0..n.
    fn w2(&self, set: &ConceptSet, name: &str) -> Result<f64> {
        let prompt = format!("a photo of a <{name}>");
        let (mut base, mut custom) = (vec![], vec![]);
        for s in 0..self.opts.w2_samples {
            let g = self.generate(set, &prompt, s as u64)?;
            base.push(g.base_latents);
            custom.push(g.custom_latents);
        }
        Ok(wasserstein(
            &Tensor::cat(&base, 0)?,
            &Tensor::cat(&custom, 0)?,
            self.opts.w2_pool,
        )?
        .w2)
    }

    /// Everything at one training step, with the concept reached.
    fn point(&self, step: usize, concept: Concept) -> Result<CurvePoint> {
        let name = concept.name.clone();
        let mut set = ConceptSet::new();
        set.insert(concept, false);
        let fisher = fisher_divergence(
            self.sd,
            &Variant::Base,
            &Variant::Concepts(&set),
            &self.opts.fisher_prompts,
            &FisherOptions {
                samples: self.opts.fisher_samples,
                gen_steps: self.opts.steps.min(25),
                ..Default::default()
            },
            self.job,
        )?;
        let w2 = self.w2(&set, &name)?;
        let (mut generated, mut prompts) = (vec![], vec![]);
        for p in &self.opts.eval_prompts {
            for s in 0..self.opts.images_per_prompt {
                let g = self.generate(
                    &set,
                    &p.replace("{}", &format!("<{name}>")),
                    1000 + s as u64,
                )?;
                generated.push(tensor_to_rgb(&g.custom_image)?);
                prompts.push(g.parsed.base.clone());
            }
        }
        let prompt_refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
        Ok(CurvePoint {
            step,
            fisher: fisher.mean,
            fisher_std_err: fisher.std_err,
            w2,
            clip_t: clip_t(self.clip, &generated, &prompt_refs)?,
            clip_i: clip_i(self.clip, &generated, self.images)?,
            dino_i: dino_i(self.dino, &generated, self.images)?,
            scorers: self.scorers.clone(),
        })
    }
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
    // The W2 latents and the scored images are kept until each checkpoint is measured.
    ensure_fits(
        "w2_samples",
        &format!("{} W2 images per side", opts.w2_samples),
        opts.w2_samples as u128 * 2 * sd.latent_bytes(),
        sd.device(),
    )?;
    let size = sd.default_size() as u128;
    ensure_fits(
        "samples",
        &format!(
            "{} images per prompt for {} prompts",
            opts.images_per_prompt,
            opts.eval_prompts.len()
        ),
        (opts.images_per_prompt * opts.eval_prompts.len()) as u128 * size * size * 3 * 2,
        &candle_core::Device::Cpu,
    )?;
    std::fs::create_dir_all(&opts.out_dir).map_err(|e| Error::io(&opts.out_dir, e))?;
    let mut trainer = crate::infusion::train::trainer(sd, name, word, images, opts.train.clone())?;
    let measure = Measure {
        sd,
        clip,
        dino,
        images,
        opts,
        job,
        scorers: super::scorers_label(clip, dino, job),
    };
    let mut points = vec![];
    for &step in &checkpoints {
        trainer.set_total_steps(step);
        if trainer.run(job)?.cancelled {
            return Err(Error::Cancelled);
        }
        let concept = crate::infusion::train::concept(&trainer)?;
        concept.save(
            &opts
                .out_dir
                .join(format!("{name}-step{step:06}.safetensors")),
            candle_core::DType::F16,
        )?;
        points.push(measure.point(step, concept)?);
    }
    let csv = opts.out_dir.join(format!("{name}-curves.csv"));
    write_csv(&csv, &points)?;
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
