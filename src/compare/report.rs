//! A comparison's results from its cells: `curves.csv` (one row per method x subject x
//! checkpoint x metric, with standard errors), figures 10 and 11 (W2 and the Fisher divergence
//! against training steps, one line per method, error bars) and `table.md` in the form of the
//! paper's Table 1 (CLIP-T, CLIP-I, DINO-I at the last checkpoint, storage per method).

use std::collections::BTreeMap;
use std::path::PathBuf;

use image::RgbImage;

use super::{mean_se, Cell, Comparison, Measure};
use crate::error::{Error, Result};
use crate::util::fs::{write_atomic, write_csv};
use crate::util::image_io::save_png;
use crate::util::plot::{line_chart, Line, PALETTE};

/// What a merge wrote, and the cells it did not find.
#[derive(Debug, Clone)]
pub struct Merged {
    pub csv: PathBuf,
    pub table: PathBuf,
    /// `fig10_w2.png`, `fig11_fisher.png`, with their images (to show inline).
    pub charts: Vec<(PathBuf, RgbImage)>,
    pub cells: usize,
    /// The cells not there yet, as their files.
    pub missing: Vec<PathBuf>,
}

/// One row of `curves.csv`: a metric of a method on a subject at a checkpoint, over the cells
/// of its prompt chunks (the mean over prompts and its standard error) or from its one cell.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    pub method: String,
    pub subject: String,
    pub step: usize,
    pub metric: String,
    pub value: f64,
    pub std_err: f64,
    pub n: usize,
    pub note: String,
}

/// The rows of `cells`, in a fixed order (method, subject, step, measure, metric).
pub fn rows(cells: &[Cell]) -> Vec<Row> {
    let mut groups: BTreeMap<(String, String, usize, Measure, String), Vec<&super::Value>> =
        BTreeMap::new();
    for c in cells {
        for v in &c.values {
            groups
                .entry((
                    c.method.clone(),
                    c.subject.clone(),
                    c.step,
                    c.measure,
                    v.metric.clone(),
                ))
                .or_default()
                .push(v);
        }
    }
    groups
        .into_iter()
        .map(|((method, subject, step, measure, metric), values)| {
            let (value, std_err, n) = match (measure, values.as_slice()) {
                // A value per prompt: their mean over the prompts.
                (Measure::W2 | Measure::Scores, many) => {
                    let v: Vec<f64> = many.iter().map(|v| v.value).collect();
                    let (m, se) = mean_se(&v);
                    (m, se, v.len())
                }
                (_, [one, ..]) => (one.value, one.std_err, one.n),
                (_, []) => (f64::NAN, f64::NAN, 0),
            };
            Row {
                method,
                subject,
                step,
                metric,
                value,
                std_err,
                n,
                note: values.first().map_or(String::new(), |v| v.note.clone()),
            }
        })
        .collect()
}

impl Comparison<'_> {
    /// The cells written so far (of this run's settings: a cell of other settings is an error
    /// naming it), and the missing ones.
    pub fn cells(&self) -> Result<(Vec<Cell>, Vec<PathBuf>)> {
        let run = self.settings_hash();
        let (mut found, mut missing) = (vec![], vec![]);
        for unit in self.units() {
            for id in self.cell_ids(unit) {
                {
                    let path = self.cell_path(id);
                    if !path.is_file() {
                        missing.push(path);
                        continue;
                    }
                    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
                    let cell: Cell = serde_json::from_str(&text).map_err(|e| Error::Format {
                        path: path.clone(),
                        msg: format!("not a comparison cell: {e}"),
                    })?;
                    if cell.run != run {
                        return Err(Error::Format {
                            path,
                            msg: format!(
                                "a cell of another run (settings {}, this run's {run})",
                                cell.run
                            ),
                        });
                    }
                    found.push(cell);
                }
            }
        }
        Ok((found, missing))
    }

    /// Builds the CSV, the charts and the table from the cells there.
    pub fn merge(&self) -> Result<Merged> {
        let (cells, missing) = self.cells()?;
        let rows = rows(&cells);
        let csv = self.out.join("curves.csv");
        write_csv(&csv, &rows)?;
        let mut charts = vec![];
        for (metric, file, title, y) in [
            (
                "w2",
                "fig10_w2.png",
                "W2 of F's and C's latents (figure 10)",
                "W2 (latent units)",
            ),
            (
                "fisher",
                "fig11_fisher.png",
                "latent Fisher divergence (figure 11)",
                "Fisher divergence (latent units^2)",
            ),
        ] {
            let lines = self.lines(&rows, metric);
            if lines.iter().all(|l| l.points.is_empty()) {
                continue;
            }
            let img = line_chart(&lines, (title, "training steps", y), (720, 480))?;
            let path = self.out.join(file);
            save_png(&img, &path, &[("chart", title.to_string())])?;
            charts.push((path, img));
        }
        if let Some((path, img)) = self.figure12(&cells)? {
            charts.push((path, img));
        }
        let table = self.out.join("table.md");
        let text = self.table(&rows);
        write_atomic(&table, |w| {
            w.write_all(text.as_bytes())
                .map_err(|e| Error::io(&table, e))
        })?;
        Ok(Merged {
            csv,
            table,
            charts,
            cells: cells.len(),
            missing,
        })
    }

    /// Figure 12 for the first subject: a row per method, F's image then C's at each
    /// checkpoint (the same prompt and seed), labelled; `None` before any image cell.
    fn figure12(&self, cells: &[Cell]) -> Result<Option<(PathBuf, RgbImage)>> {
        let Some(subject) = self.subjects.first() else {
            return Ok(None);
        };
        let mut images = vec![];
        let mut labels = vec![];
        let mut any = false;
        let cols = self.opts.checkpoints.len() + 1;
        for (mi, m) in self.opts.methods.iter().enumerate() {
            let unit = super::Unit {
                subject: 0,
                method: mi,
            };
            let cell_file = |step| {
                self.cell_path(super::CellId {
                    unit,
                    step,
                    measure: Measure::Image,
                    chunk: None,
                })
            };
            let has = |step: usize| {
                cells.iter().any(|c| {
                    &c.method == m
                        && c.subject == subject.name
                        && c.step == step
                        && c.measure == Measure::Image
                })
            };
            let base = self
                .opts
                .checkpoints
                .iter()
                .find(|&&s| has(s))
                .map(|&s| super::image_path(&cell_file(s), "base"));
            let mut row = vec![(base, format!("{m}: base"))];
            for &s in &self.opts.checkpoints {
                let path = has(s).then(|| super::image_path(&cell_file(s), "custom"));
                row.push((path, format!("{m}, step {s}")));
            }
            for (path, label) in row {
                let img = match path {
                    Some(p) => {
                        any = true;
                        crate::util::image_io::load_image(&p)?
                    }
                    None => RgbImage::from_pixel(8, 8, image::Rgb([230, 230, 230])),
                };
                images.push(img);
                labels.push(label);
            }
        }
        if !any {
            return Ok(None);
        }
        let grid = crate::util::text_render::labelled_grid(
            &images,
            cols,
            &labels,
            4,
            image::Rgb([255, 255, 255]),
        )?;
        let path = self.out.join("fig12_grid.png");
        save_png(&grid, &path, &[("subject", subject.name.clone())])?;
        Ok(Some((path, grid)))
    }

    /// One line per method: `metric` at each checkpoint, the mean over subjects (error bars:
    /// the standard error over subjects, or the cell's own for one subject).
    fn lines(&self, rows: &[Row], metric: &str) -> Vec<Line> {
        self.opts
            .methods
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let points = self
                    .opts
                    .checkpoints
                    .iter()
                    .filter_map(|&step| {
                        let v: Vec<(f64, f64)> = rows
                            .iter()
                            .filter(|r| &r.method == m && r.step == step && r.metric == metric)
                            .map(|r| (r.value, r.std_err))
                            .collect();
                        match v.as_slice() {
                            [] => None,
                            [(value, se)] => Some((step as f64, *value, Some(*se))),
                            many => {
                                let values: Vec<f64> = many.iter().map(|(v, _)| *v).collect();
                                let (mean, se) = mean_se(&values);
                                Some((step as f64, mean, Some(se)))
                            }
                        }
                    })
                    .collect();
                Line {
                    label: m.clone(),
                    color: PALETTE[i % PALETTE.len()],
                    points,
                }
            })
            .collect()
    }

    /// The paper's Table 1: per method, CLIP-T, CLIP-I and DINO-I at the last checkpoint (the
    /// mean over subjects) and the storage of its file.
    fn table(&self, rows: &[Row]) -> String {
        let last = *self.opts.checkpoints.last().unwrap_or(&0);
        let mut text =
            "| method | CLIP-T | CLIP-I | DINO-I | storage |\n|---|---|---|---|---|\n".to_string();
        for m in &self.opts.methods {
            let mean = |metric: &str| -> Option<f64> {
                let v: Vec<f64> = rows
                    .iter()
                    .filter(|r| &r.method == m && r.step == last && r.metric == metric)
                    .map(|r| r.value)
                    .collect();
                (!v.is_empty()).then(|| mean_se(&v).0)
            };
            let cell = |metric: &str| mean(metric).map_or("-".to_string(), |v| format!("{v:.3}"));
            let storage = mean("bytes").map_or("-".to_string(), human_bytes);
            text.push_str(&format!(
                "| {m} | {} | {} | {} | {storage} |\n",
                cell("clip_t"),
                cell("clip_i"),
                cell("dino_i")
            ));
        }
        text.push_str(&format!(
            "\nAt step {last}, the mean over {} subject(s); scores with {}, {}.\n",
            self.subjects.len(),
            crate::metrics::scorer_label("CLIP", self.clip.path()),
            crate::metrics::scorer_label("DINO", self.dino.path())
        ));
        text
    }
}

fn human_bytes(b: f64) -> String {
    match b {
        b if b >= 1e9 => format!("{:.1} GB", b / 1e9),
        b if b >= 1e6 => format!("{:.1} MB", b / 1e6),
        b if b >= 1e3 => format!("{:.1} KB", b / 1e3),
        b => format!("{b:.0} B"),
    }
}
