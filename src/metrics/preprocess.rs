//! Image preprocessing of the metric models, exactly as transformers' PIL backend does it.
//!
//! Scores are only comparable with published ones when the pixels are: Pillow's 8-bit
//! resampling bit for bit ([`crate::util::resize`]), then the crop, rescale and normalisation of
//! the model's `preprocessor_config.json`.

use std::path::Path;

use candle_core::{Device, Tensor};
use image::RgbImage;
use serde_json::Value;

use crate::error::{Error, Result};
pub use crate::util::resize::{pillow_resize, Filter};

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
