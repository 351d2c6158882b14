//! Pillow's 8-bit resampling, bit for bit (separable passes with fixed-point weights, the first
//! pass rounded to uint8, Pillow 13's pass order): what the metric models' preprocessing and
//! the training scripts' augmentations (`Image.resize`) do to pixels.

use image::RgbImage;

/// Pillow's resampling filters.
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
