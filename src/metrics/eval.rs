//! The evaluation runner, after the paper's protocol: every concept x every prompt x N images,
//! scored with CLIP-T, CLIP-I and DINO-I, written as a CSV (one row per image) and a markdown
//! table (per concept, with its storage). Resumable: rows already in the CSV are not redone,
//! and the CSV is rewritten atomically after every image, so an interrupted run loses at most
//! the image in progress and a restarted one ends with the same table.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::clip::Clip;
use super::dino::Dino;
use super::scores::Scorer;
use crate::customize::generate::{generate_pair, PairOptions};
use crate::customize::set::ConceptSet;
use crate::error::{Error, Result};
use crate::job::Job;
use crate::sd::pipeline::{GenerateOptions, StableDiffusion};
use crate::util::fs::{write_atomic, write_csv};
use crate::util::image_io::load_folder_images;
use crate::util::image_io::{save_png, tensor_to_rgb};

/// A concept to evaluate: its file and the folder of its training images.
#[derive(Debug, Clone)]
pub struct EvalConcept {
    pub file: PathBuf,
    pub images: PathBuf,
}

#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Prompts with `{}` where the concept goes (as `<name>`).
    pub prompts: Vec<String>,
    pub images_per_prompt: usize,
    pub steps: usize,
    pub guidance: f64,
    /// Image `i` of every prompt uses seed `seed + i`.
    pub seed: u64,
    pub out_dir: PathBuf,
    /// Use concepts trained on another model.
    pub force: bool,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            prompts: vec!["a photo of a {}".into()],
            images_per_prompt: 4,
            steps: 50,
            guidance: 8.0,
            seed: 0,
            out_dir: PathBuf::from("eval"),
            force: false,
        }
    }
}

/// One generated image and its scores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalRow {
    pub concept: String,
    pub prompt_index: usize,
    pub sample: usize,
    pub seed: u64,
    pub prompt: String,
    pub image: String,
    pub clip_t: f64,
    pub clip_i: f64,
    pub dino_i: f64,
    /// The CLIP and DINO the scores come from (older CSVs have none).
    #[serde(default)]
    pub scorers: String,
}

/// Per-concept means.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvalSummary {
    pub concept: String,
    pub images: usize,
    pub clip_t: f64,
    pub clip_i: f64,
    pub dino_i: f64,
    pub storage_bytes: u64,
}

#[derive(Debug, Clone)]
pub struct EvalReport {
    pub rows: Vec<EvalRow>,
    pub summary: Vec<EvalSummary>,
    pub csv: PathBuf,
    pub table: PathBuf,
    pub markdown: String,
}

fn read_rows(path: &Path) -> Result<Vec<EvalRow>> {
    if !path.is_file() {
        return Ok(vec![]);
    }
    let mut r = csv::Reader::from_path(path).map_err(|e| Error::config(path, e))?;
    r.deserialize()
        .map(|row| row.map_err(|e| Error::config(path, format!("unreadable row: {e}"))))
        .collect()
}

/// Means per concept, rows in (concept, prompt, sample) order.
pub fn summarize(rows: &[EvalRow], storage: &BTreeMap<String, u64>) -> Vec<EvalSummary> {
    let mut by: BTreeMap<&str, Vec<&EvalRow>> = BTreeMap::new();
    for r in rows {
        by.entry(&r.concept).or_default().push(r);
    }
    by.into_iter()
        .map(|(c, mut rs)| {
            rs.sort_by_key(|r| (r.prompt_index, r.sample));
            let n = rs.len() as f64;
            let mean = |f: fn(&EvalRow) -> f64| rs.iter().map(|r| f(r)).sum::<f64>() / n;
            EvalSummary {
                concept: c.to_string(),
                images: rs.len(),
                clip_t: mean(|r| r.clip_t),
                clip_i: mean(|r| r.clip_i),
                dino_i: mean(|r| r.dino_i),
                storage_bytes: storage.get(c).copied().unwrap_or(0),
            }
        })
        .collect()
}

/// The markdown table of a summary, and the scorers it was made with.
pub fn markdown(summary: &[EvalSummary], scorers: &str) -> String {
    let mut s = String::from("| concept | images | CLIP-T | CLIP-I | DINO-I | storage |\n|---|---:|---:|---:|---:|---:|\n");
    for e in summary {
        s.push_str(&format!(
            "| {} | {} | {:.4} | {:.4} | {:.4} | {:.1} KB |\n",
            e.concept,
            e.images,
            e.clip_t,
            e.clip_i,
            e.dino_i,
            e.storage_bytes as f64 / 1024.0
        ));
    }
    s.push_str(&format!("\nScored with {scorers}.\n"));
    s
}

fn check_options(opts: &EvalOptions) -> Result<()> {
    if opts.prompts.is_empty() || opts.images_per_prompt == 0 {
        return Err(Error::arg(
            "prompts",
            "nothing to evaluate: no prompts or no images per prompt",
        ));
    }
    if let Some(p) = opts.prompts.iter().find(|p| !p.contains("{}")) {
        return Err(Error::arg(
            "prompts",
            format!("{p:?} has no `{{}}` for the concept"),
        ));
    }
    Ok(())
}

/// One concept of an evaluation: its set, its name, its scorer.
struct Subject<'a> {
    set: ConceptSet,
    name: String,
    scorer: Scorer<'a>,
    /// The scorers' labels, recorded in every row.
    scorers: &'a str,
}

impl Subject<'_> {
    /// Generates image `sample` of prompt `p`, saves it under `dir` and scores it.
    fn row(
        &self,
        sd: &StableDiffusion,
        opts: &EvalOptions,
        (p, sample): (usize, usize),
        job: &Job,
    ) -> Result<EvalRow> {
        let name = &self.name;
        let prompt = opts.prompts[p].replace("{}", &format!("<{name}>"));
        let seed = opts.seed + sample as u64;
        let io = PairOptions::from(GenerateOptions {
            seed,
            steps: opts.steps,
            guidance: opts.guidance,
            ..Default::default()
        });
        let g = generate_pair(sd, &self.set, &prompt, &io, None, job)?;
        let img = tensor_to_rgb(&g.custom_image)?;
        let rel = format!("images/{name}/p{p:03}-s{sample:03}.png");
        save_png(&img, &opts.out_dir.join(&rel), &g.png_text())?;
        let scores = self.scorer.score(&img, &g.parsed.base)?;
        Ok(EvalRow {
            concept: name.clone(),
            prompt_index: p,
            sample,
            seed,
            prompt,
            image: rel,
            clip_t: scores.clip_t,
            clip_i: scores.clip_i,
            dino_i: scores.dino_i,
            scorers: self.scorers.to_string(),
        })
    }
}

/// Runs (or resumes) an evaluation. `on_row` sees every new row; an error from it stops the
/// run (what is done is kept).
pub fn evaluate(
    sd: &StableDiffusion,
    clip: &Clip,
    dino: &Dino,
    concepts: &[EvalConcept],
    opts: &EvalOptions,
    job: &Job,
    on_row: &mut dyn FnMut(&EvalRow) -> Result<()>,
) -> Result<EvalReport> {
    check_options(opts)?;
    let scorers = super::scorers_label(clip, dino, job);
    let dir = &opts.out_dir;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let csv_path = dir.join("scores.csv");
    let mut rows = read_rows(&csv_path)?;
    let done: HashSet<(String, usize, usize)> = rows
        .iter()
        .map(|r| (r.concept.clone(), r.prompt_index, r.sample))
        .collect();
    let total = concepts.len() * opts.prompts.len() * opts.images_per_prompt;
    let bar = job.bar(total, "evaluate");
    bar.inc(done.len().min(total) as u64);
    let mut storage = BTreeMap::new();
    for ec in concepts {
        let mut set = ConceptSet::new();
        let name = set
            .load_file(&ec.file, Some(sd), opts.force, job)?
            .name()
            .to_string();
        let bytes = std::fs::metadata(&ec.file)
            .map_err(|e| Error::io(&ec.file, e))?
            .len();
        storage.insert(name.clone(), bytes);
        let todo: Vec<(usize, usize)> = (0..opts.prompts.len())
            .flat_map(|p| (0..opts.images_per_prompt).map(move |s| (p, s)))
            .filter(|(p, s)| !done.contains(&(name.clone(), *p, *s)))
            .collect();
        if todo.is_empty() {
            continue;
        }
        let img_dir = dir.join("images").join(&name);
        std::fs::create_dir_all(&img_dir).map_err(|e| Error::io(&img_dir, e))?;
        let subject = Subject {
            set,
            name,
            scorer: Scorer::new(clip, dino, &load_folder_images(&ec.images, job)?)?,
            scorers: &scorers,
        };
        for at in todo {
            job.check()?;
            let row = subject.row(sd, opts, at, job)?;
            rows.push(row.clone());
            rows.sort_by(|a, b| {
                (&a.concept, a.prompt_index, a.sample).cmp(&(&b.concept, b.prompt_index, b.sample))
            });
            write_csv(&csv_path, &rows)?;
            bar.inc(1);
            on_row(&row)?;
        }
    }
    bar.finish_and_clear();
    let summary = summarize(&rows, &storage);
    let md = markdown(&summary, &scorers);
    let table = dir.join("table.md");
    write_atomic(&table, |w| {
        w.write_all(md.as_bytes()).map_err(|e| Error::io(&table, e))
    })?;
    Ok(EvalReport {
        rows,
        summary,
        csv: csv_path,
        table,
        markdown: md,
    })
}
