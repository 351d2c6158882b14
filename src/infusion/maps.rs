//! Per-token cross-attention maps of F and C, captured during a generation.
//!
//! Maps are averaged over heads as they are recorded (the conditional row of each stream), and
//! summed over steps per layer, as prompt-to-prompt's attention store does; with `keep_steps`,
//! every step's map is kept too. They can be aggregated over the layers of one resolution,
//! upsampled to the image, rendered as a heat-map overlay, or written out as safetensors.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};
use image::{ImageBuffer, Luma, RgbImage};

use super::Stream;
use crate::error::{Error, Result};
use crate::sd::attention::AttentionCall;
use crate::sd::hook::{AttnSite, Guidance};
use crate::util::fs::write_atomic;

#[derive(Debug)]
struct Entry {
    spatial: (usize, usize),
    /// Sum over recorded steps of the head-mean map, `(h * w, keys)`, f32 on the CPU.
    sum: Tensor,
    count: usize,
    steps: BTreeMap<usize, Tensor>,
}

/// A store of cross-attention maps, filled by a hook during generation.
#[derive(Debug, Default)]
pub struct AttentionMaps {
    keep_steps: bool,
    /// Only layers with at most this many queries are recorded (`None`: all).
    max_queries: Option<usize>,
    entries: Mutex<BTreeMap<(Stream, String), Entry>>,
}

impl AttentionMaps {
    /// A store that keeps the step sums, and with `keep_steps` every step's maps as well.
    pub fn new(keep_steps: bool) -> Self {
        Self {
            keep_steps,
            max_queries: None,
            entries: Mutex::new(BTreeMap::new()),
        }
    }

    /// A cheap store for interactive use: step sums of the layers with at most `max_queries`
    /// queries (256 = the 16x16 maps prompt-to-prompt shows), nothing per step.
    pub fn light(max_queries: usize) -> Self {
        Self {
            max_queries: Some(max_queries),
            ..Self::new(false)
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(Stream, String), Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the conditional rows (sample 0) of both streams from an attention call.
    pub fn record(&self, site: &AttnSite<'_>, call: &mut AttentionCall) -> candle_core::Result<()> {
        if self
            .max_queries
            .is_some_and(|m| site.spatial.0 * site.spatial.1 > m)
        {
            return Ok(());
        }
        let step = site.step.map(|s| s.index).unwrap_or(0);
        for stream in [Stream::Foundational, Stream::Customized] {
            let Some(row) = site.rows.find(stream.branch(), Guidance::Conditional, 0) else {
                continue;
            };
            let map = call
                .probs(row)?
                .mean(0)?
                .to_dtype(DType::F32)?
                .to_device(&Device::Cpu)?;
            let mut entries = self.lock();
            let key = (stream, site.layer.path.clone());
            match entries.get_mut(&key) {
                Some(e) => {
                    e.sum = (&e.sum + &map)?;
                    e.count += 1;
                    if self.keep_steps {
                        e.steps.insert(step, map);
                    }
                }
                None => {
                    let mut steps = BTreeMap::new();
                    if self.keep_steps {
                        steps.insert(step, map.clone());
                    }
                    entries.insert(
                        key,
                        Entry {
                            spatial: site.spatial,
                            sum: map,
                            count: 1,
                            steps,
                        },
                    );
                }
            }
        }
        Ok(())
    }

    /// True when nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// The stream whose maps answer for `stream`: C falls back to F when C was not recorded
    /// (a prompt without concepts, where C is F).
    fn resolve(&self, stream: Stream) -> Stream {
        let entries = self.lock();
        if stream == Stream::Customized && !entries.keys().any(|(s, _)| *s == stream) {
            Stream::Foundational
        } else {
            stream
        }
    }

    /// Recorded layers with their feature-map size `(h, w)`, in path order.
    pub fn layers(&self) -> Vec<(String, (usize, usize))> {
        let mut out: Vec<_> = self
            .lock()
            .iter()
            .filter(|((s, _), _)| *s == Stream::Foundational)
            .map(|((_, l), e)| (l.clone(), e.spatial))
            .collect();
        out.dedup();
        out
    }

    /// Feature-map sizes recorded, largest first.
    pub fn resolutions(&self) -> Vec<(usize, usize)> {
        let mut r: Vec<_> = self.layers().into_iter().map(|(_, s)| s).collect();
        r.sort_by_key(|&(h, w)| std::cmp::Reverse(h * w));
        r.dedup();
        r
    }

    /// Steps kept (with `keep_steps`).
    pub fn steps(&self) -> Vec<usize> {
        let entries = self.lock();
        let mut s: Vec<usize> = entries
            .values()
            .flat_map(|e| e.steps.keys().copied())
            .collect();
        s.sort_unstable();
        s.dedup();
        s
    }

    /// One layer's map `(h, w, keys)`: the mean over steps, or one step's.
    pub fn layer_map(&self, stream: Stream, layer: &str, step: Option<usize>) -> Result<Tensor> {
        let stream = self.resolve(stream);
        let entries = self.lock();
        let e = entries
            .get(&(stream, layer.to_string()))
            .ok_or_else(|| Error::arg("layer", format!("no maps recorded for `{layer}`")))?;
        let (h, w) = e.spatial;
        let m = match step {
            None => (&e.sum / e.count as f64)?,
            Some(s) => e
                .steps
                .get(&s)
                .ok_or_else(|| {
                    Error::arg(
                        "step",
                        format!(
                            "step {s} of `{layer}` was not kept (kept: {:?}; capture with keep_steps)",
                            e.steps.keys().collect::<Vec<_>>()
                        ),
                    )
                })?
                .clone(),
        };
        let keys = m.dim(1)?;
        Ok(m.reshape((h, w, keys))?)
    }

    /// The mean over steps and over every layer of feature-map size `resolution` (default: the
    /// largest size at most 16x16 if any, as prompt-to-prompt shows, else the smallest), `(h, w,
    /// keys)`.
    pub fn aggregate(&self, stream: Stream, resolution: Option<(usize, usize)>) -> Result<Tensor> {
        let res = match resolution {
            Some(r) => r,
            None => {
                let all = self.resolutions();
                all.iter()
                    .copied()
                    .find(|&(h, w)| h * w <= 256)
                    .or_else(|| all.last().copied())
                    .ok_or_else(|| Error::arg("maps", "no attention maps were recorded"))?
            }
        };
        let layers: Vec<String> = self
            .layers()
            .into_iter()
            .filter(|(_, s)| *s == res)
            .map(|(l, _)| l)
            .collect();
        if layers.is_empty() {
            return Err(Error::arg(
                "resolution",
                format!(
                    "no layer works at {}x{} (recorded: {:?})",
                    res.0,
                    res.1,
                    self.resolutions()
                ),
            ));
        }
        let maps = layers
            .iter()
            .map(|l| self.layer_map(stream, l, None))
            .collect::<Result<Vec<_>>>()?;
        Ok((Tensor::stack(&maps, 0)?.sum(0)? / maps.len() as f64)?)
    }

    /// Writes every map as safetensors: `F/<layer>` and `C/<layer>` (mean over steps,
    /// `(h, w, keys)`), and `F/<layer>/step<i>` for kept steps.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors: Vec<(String, Tensor)> = vec![];
        for ((stream, layer), e) in self.lock().iter() {
            let (h, w) = e.spatial;
            let keys = e.sum.dim(1)?;
            let tag = stream.tag();
            tensors.push((
                format!("{tag}/{layer}"),
                (&e.sum / e.count as f64)?.reshape((h, w, keys))?,
            ));
            for (s, m) in &e.steps {
                tensors.push((format!("{tag}/{layer}/step{s}"), m.reshape((h, w, keys))?));
            }
        }
        let bytes = safetensors::serialize(tensors, None)
            .map_err(|e| Error::Internal(format!("cannot serialize the attention maps: {e}")))?;
        write_atomic(path, |w| {
            w.write_all(&bytes).map_err(|e| Error::io(path, e))
        })
    }
}

/// The map of some token positions from an `(h, w, keys)` map: their sum, `(h, w)`.
pub fn token_map(map: &Tensor, positions: &[usize]) -> Result<Tensor> {
    let keys = map.dim(2)?;
    if let Some(&p) = positions.iter().find(|&&p| p >= keys) {
        return Err(Error::arg(
            "token",
            format!("position {p} is past the {keys} keys"),
        ));
    }
    let idx = Tensor::new(
        positions.iter().map(|&p| p as u32).collect::<Vec<_>>(),
        map.device(),
    )?;
    Ok(map.index_select(&idx, 2)?.sum(2)?)
}

/// Upsamples an `(h, w)` map to `width` x `height` (bilinear), scaled to [0, 1].
pub fn upsample_unit(
    map: &Tensor,
    width: u32,
    height: u32,
) -> Result<ImageBuffer<Luma<f32>, Vec<f32>>> {
    let (h, w) = map.dims2()?;
    let data: Vec<f32> = map.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let (lo, hi) = data
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
    let span = if hi > lo { hi - lo } else { 1.0 };
    let norm: Vec<f32> = data.iter().map(|v| (v - lo) / span).collect();
    let small = ImageBuffer::<Luma<f32>, Vec<f32>>::from_raw(w as u32, h as u32, norm)
        .ok_or_else(|| Error::Internal(format!("a {h}x{w} map of {} values", data.len())))?;
    Ok(image::imageops::resize(
        &small,
        width,
        height,
        image::imageops::FilterType::Triangle,
    ))
}

/// A perceptual dark-to-bright colour ramp (close to matplotlib's "inferno").
pub fn heat_color(v: f32) -> [u8; 3] {
    const STOPS: [[f32; 3]; 5] = [
        [0.0, 0.0, 4.0],
        [87.0, 16.0, 110.0],
        [188.0, 55.0, 84.0],
        [249.0, 142.0, 9.0],
        [252.0, 255.0, 164.0],
    ];
    let v = v.clamp(0.0, 1.0) * (STOPS.len() - 1) as f32;
    let i = (v.floor() as usize).min(STOPS.len() - 2);
    let t = v - i as f32;
    let c = |k: usize| (STOPS[i][k] + t * (STOPS[i + 1][k] - STOPS[i][k])).round() as u8;
    [c(0), c(1), c(2)]
}

/// Blends the heat map of `map` (`(h, w)`) over `image` with opacity `alpha`.
pub fn overlay(image: &RgbImage, map: &Tensor, alpha: f32) -> Result<RgbImage> {
    let heat = upsample_unit(map, image.width(), image.height())?;
    let mut out = image.clone();
    for (x, y, px) in out.enumerate_pixels_mut() {
        let c = heat_color(heat.get_pixel(x, y)[0]);
        for k in 0..3 {
            px[k] = ((1.0 - alpha) * px[k] as f32 + alpha * c[k] as f32).round() as u8;
        }
    }
    Ok(out)
}
