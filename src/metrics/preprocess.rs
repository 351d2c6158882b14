//! Image preprocessing of the metric models, exactly as transformers' PIL backend does it.
//!
//! Scores are only comparable with published ones when the pixels are: this reproduces Pillow's
//! 8-bit resampling bit for bit (separable passes with fixed-point weights, the first pass
//! rounded to uint8, Pillow 13's pass order), then the crop, rescale and normalisation of the
//! model's `preprocessor_config.json`.

use std::path::Path;

use candle_core::{Device, Tensor};
use image::RgbImage;
use serde_json::Value;

use crate::error::{Error, Result};

/// Pillow's resampling filters used by the metric models.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// `Image.BILINEAR` (2)
    Bilinear,
    /// `Image.BICUBIC` (3)
    Bicubic,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
        }
    }

    fn eval(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Filter::Bilinear => {
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Filter::Bicubic => {
                const A: f64 = -0.5;
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per output index: the first input index and the fixed-point weights.
fn coefficients(in_size: usize, out_size: usize, filter: Filter) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ss = 1.0 / filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let w: Vec<f64> = (xmin..xmax)
                .map(|x| filter.eval((x as f64 - center + 0.5) * ss))
                .collect();
            let total: f64 = w.iter().sum();
            let k = w
                .iter()
                .map(|&v| {
                    let v = if total != 0.0 { v / total } else { v };
                    let s = v * (1u32 << PRECISION_BITS) as f64;
                    if v < 0.0 {
                        (s - 0.5) as i32
                    } else {
                        (s + 0.5) as i32
                    }
                })
                .collect();
            (xmin, k)
        })
        .collect()
}

fn clip8(v: i32) -> u8 {
    if v <= 0 {
        0
    } else if v >= (255 << PRECISION_BITS) {
        255
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

fn pass_horizontal(img: &RgbImage, out_w: usize, filter: Filter) -> RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let coeffs = coefficients(w, out_w, filter);
    let src = img.as_raw();
    let mut out = vec![0u8; out_w * h * 3];
    for y in 0..h {
        for (xx, (xmin, k)) in coeffs.iter().enumerate() {
            for c in 0..3 {
                let mut ss: i32 = 1 << (PRECISION_BITS - 1);
                for (j, &kj) in k.iter().enumerate() {
                    ss += src[(y * w + xmin + j) * 3 + c] as i32 * kj;
                }
                out[(y * out_w + xx) * 3 + c] = clip8(ss);
            }
        }
    }
    RgbImage::from_raw(out_w as u32, h as u32, out).expect("sizes match")
}

fn pass_vertical(img: &RgbImage, out_h: usize, filter: Filter) -> RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let coeffs = coefficients(h, out_h, filter);
    let src = img.as_raw();
    let mut out = vec![0u8; w * out_h * 3];
    for (yy, (ymin, k)) in coeffs.iter().enumerate() {
        for x in 0..w {
            for c in 0..3 {
                let mut ss: i32 = 1 << (PRECISION_BITS - 1);
                for (j, &kj) in k.iter().enumerate() {
                    ss += src[((ymin + j) * w + x) * 3 + c] as i32 * kj;
                }
                out[(yy * w + x) * 3 + c] = clip8(ss);
            }
        }
    }
    RgbImage::from_raw(w as u32, out_h as u32, out).expect("sizes match")
}

/// `Image.resize((w, h), filter)` of Pillow 13 on an 8-bit RGB image.
pub fn pillow_resize(img: &RgbImage, out_w: u32, out_h: u32, filter: Filter) -> RgbImage {
    let (in_w, in_h) = (img.width() as i64, img.height() as i64);
    let (ow, oh) = (out_w as i64, out_h as i64);
    let need_h = ow != in_w;
    let need_v = oh != in_h;
    match (need_h, need_v) {
        (false, false) => img.clone(),
        (true, false) => pass_horizontal(img, out_w as usize, filter),
        (false, true) => pass_vertical(img, out_h as usize, filter),
        (true, true) => {
            // Pillow 13 (PR #9549) runs the vertical pass first when it shrinks much more.
            if oh < in_h && (in_h - oh) > 2 * (in_w - ow) {
                pass_horizontal(
                    &pass_vertical(img, out_h as usize, filter),
                    out_w as usize,
                    filter,
                )
            } else {
                pass_vertical(
                    &pass_horizontal(img, out_w as usize, filter),
                    out_h as usize,
                    filter,
                )
            }
        }
    }
}

/// How a metric model wants its images.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessor {
    /// Resize the short side to this (CLIP), or `None` to resize to `size` exactly (DINO).
    pub shortest_edge: Option<u32>,
    /// Exact size `(h, w)` when there is no shortest-edge resize.
    pub size: Option<(u32, u32)>,
    /// Centre crop `(h, w)`, if any.
    pub crop: Option<(u32, u32)>,
    pub filter: Filter,
    pub rescale: f64,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// (shortest edge, exact (h, w)) of a `size` entry.
type SizeSpec = (Option<u32>, Option<(u32, u32)>);

fn size_of(v: &Value) -> Option<SizeSpec> {
    match v {
        Value::Number(n) => Some((Some(n.as_u64()? as u32), None)),
        Value::Object(o) => {
            if let Some(s) = o.get("shortest_edge").and_then(Value::as_u64) {
                Some((Some(s as u32), None))
            } else {
                let h = o.get("height")?.as_u64()? as u32;
                let w = o.get("width")?.as_u64()? as u32;
                Some((None, Some((h, w))))
            }
        }
        _ => None,
    }
}

fn crop_of(v: &Value) -> Option<(u32, u32)> {
    match v {
        Value::Number(n) => Some((n.as_u64()? as u32, n.as_u64()? as u32)),
        Value::Object(o) => Some((
            o.get("height")?.as_u64()? as u32,
            o.get("width")?.as_u64()? as u32,
        )),
        _ => None,
    }
}

fn triple(v: Option<&Value>, path: &Path, key: &str) -> Result<[f32; 3]> {
    let arr = v
        .and_then(Value::as_array)
        .filter(|a| a.len() == 3)
        .ok_or_else(|| Error::config(path, format!("`{key}` is not a list of 3 numbers")))?;
    let mut out = [0f32; 3];
    for (o, x) in out.iter_mut().zip(arr) {
        *o = x
            .as_f64()
            .ok_or_else(|| Error::config(path, format!("`{key}` is not a list of numbers")))?
            as f32;
    }
    Ok(out)
}

impl ImageProcessor {
    /// Reads `preprocessor_config.json` in either spelling (legacy `"size": 224`, `"crop_size":
    /// 224` or `{"shortest_edge": 224}`, `{"height": 224, "width": 224}`).
    ///
    /// `size_means_shortest_edge`: what a bare number `size` means. CLIP's processor resizes the
    /// short side to it; ViT's (DINO) resizes to a square of it.
    pub fn from_file(path: &Path, size_means_shortest_edge: bool) -> Result<Self> {
        let v: Value = crate::sd::config::read_json(path)?;
        let (mut shortest_edge, mut size) = v
            .get("size")
            .and_then(size_of)
            .ok_or_else(|| Error::config(path, "no usable `size`"))?;
        if !size_means_shortest_edge {
            if let Some(s) = shortest_edge.take() {
                size = Some((s, s));
            }
        }
        let do_crop = v
            .get("do_center_crop")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let crop = if do_crop {
            Some(v.get("crop_size").and_then(crop_of).ok_or_else(|| {
                Error::config(path, "do_center_crop without a usable `crop_size`")
            })?)
        } else {
            None
        };
        let filter = match v.get("resample").and_then(Value::as_u64) {
            Some(2) => Filter::Bilinear,
            Some(3) | None => Filter::Bicubic,
            Some(r) => {
                return Err(Error::Unsupported(format!(
                    "{}: resample {r} (only bilinear 2 and bicubic 3)",
                    path.display()
                )))
            }
        };
        Ok(Self {
            shortest_edge,
            size,
            crop,
            filter,
            rescale: v
                .get("rescale_factor")
                .and_then(Value::as_f64)
                .unwrap_or(1.0 / 255.0),
            mean: triple(v.get("image_mean"), path, "image_mean")?,
            std: triple(v.get("image_std"), path, "image_std")?,
        })
    }

    /// The resized (and cropped) 8-bit image.
    pub fn resize_crop(&self, img: &RgbImage) -> RgbImage {
        let (w, h) = img.dimensions();
        let resized = match (self.shortest_edge, self.size) {
            (Some(s), _) => {
                let (nw, nh) = if w <= h {
                    (s, (s as u64 * h as u64 / w as u64) as u32)
                } else {
                    ((s as u64 * w as u64 / h as u64) as u32, s)
                };
                pillow_resize(img, nw, nh, self.filter)
            }
            (None, Some((sh, sw))) => pillow_resize(img, sw, sh, self.filter),
            (None, None) => img.clone(),
        };
        match self.crop {
            Some((ch, cw)) => {
                let (w, h) = resized.dimensions();
                let top = h.saturating_sub(ch) / 2;
                let left = w.saturating_sub(cw) / 2;
                image::imageops::crop_imm(&resized, left, top, cw.min(w), ch.min(h)).to_image()
            }
            None => resized,
        }
    }

    /// `(n, 3, H, W)` pixel values of several images.
    pub fn batch(&self, images: &[RgbImage], device: &Device) -> Result<Tensor> {
        let px = images
            .iter()
            .map(|i| self.pixel_values(i, device))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::stack(&px, 0)?)
    }

    /// `(3, H, W)` pixel values: `float32(u8 * rescale)`, then `(x - mean) / std` in float32.
    pub fn pixel_values(&self, img: &RgbImage, device: &Device) -> Result<Tensor> {
        let img = self.resize_crop(img);
        let (w, h) = (img.width() as usize, img.height() as usize);
        let mut data = vec![0f32; 3 * h * w];
        for (i, px) in img.as_raw().chunks_exact(3).enumerate() {
            for c in 0..3 {
                let x = (px[c] as f64 * self.rescale) as f32;
                data[c * h * w + i] = (x - self.mean[c]) / self.std[c];
            }
        }
        Ok(Tensor::from_vec(data, (3, h, w), device)?)
    }
}
