//! Images in and out: tensors to RGB, PNG files written atomically with text metadata.

use std::io::Write;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use image::RgbImage;

use crate::error::{Error, Result};

/// An image tensor `(3, H, W)` or `(1, 3, H, W)` with values in [0, 1] -> 8-bit RGB, rounding
/// like diffusers' `numpy_to_pil` (`(x * 255).round()`).
pub fn tensor_to_rgb(image: &Tensor) -> Result<RgbImage> {
    let image = match image.rank() {
        4 if image.dim(0)? == 1 => image.squeeze(0)?,
        3 => image.clone(),
        _ => {
            return Err(Error::arg(
                "image",
                format!("expected a (3, H, W) tensor, got shape {:?}", image.dims()),
            ))
        }
    };
    let (c, h, w) = image.dims3()?;
    if c != 3 {
        return Err(Error::arg("image", format!("{c} channels, expected 3")));
    }
    let data: Vec<u8> = image
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .clamp(0f32, 1f32)?
        .affine(255.0, 0.0)?
        .round()?
        .permute((1, 2, 0))?
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(|v| v as u8)
        .collect();
    RgbImage::from_raw(w as u32, h as u32, data)
        .ok_or_else(|| Error::arg("image", "pixel buffer does not match its size"))
}

/// Writes `path` through a temporary file in the same folder and a rename, so a crash or an error
/// never leaves a half-written file behind.
pub fn write_atomic(path: &Path, write: impl FnOnce(&mut dyn Write) -> Result<()>) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".infusion-")
        .tempfile_in(dir)
        .map_err(|e| Error::io(path, e))?;
    {
        let mut w = std::io::BufWriter::new(tmp.as_file_mut());
        write(&mut w)?;
        w.flush().map_err(|e| Error::io(path, e))?;
    }
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

/// Saves `img` as PNG at `path` (atomically), with `text` as tEXt chunks (keyword, value).
pub fn save_png(img: &RgbImage, path: &Path, text: &[(&str, String)]) -> Result<()> {
    write_atomic(path, |w| {
        let mut enc = png::Encoder::new(w, img.width(), img.height());
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        for (k, v) in text {
            enc.add_text_chunk(k.to_string(), v.clone())
                .map_err(|e| Error::Image {
                    path: path.to_path_buf(),
                    msg: e.to_string(),
                })?;
        }
        let png_err = |e: png::EncodingError| Error::Image {
            path: path.to_path_buf(),
            msg: e.to_string(),
        };
        let mut writer = enc.write_header().map_err(png_err)?;
        writer.write_image_data(img.as_raw()).map_err(png_err)?;
        writer.finish().map_err(png_err)
    })
}

/// Images side by side in rows of `cols`, each cell the size of the largest image (smaller ones
/// centred on black).
pub fn grid(images: &[RgbImage], cols: usize) -> Result<RgbImage> {
    grid_on(images, cols, image::Rgb([0, 0, 0]))
}

/// [`grid`] on a background colour.
pub fn grid_on(images: &[RgbImage], cols: usize, background: image::Rgb<u8>) -> Result<RgbImage> {
    if images.is_empty() {
        return Err(Error::arg("images", "no images to put in a grid"));
    }
    if cols == 0 {
        return Err(Error::arg("cols", "must be at least 1"));
    }
    let cw = images.iter().map(|i| i.width()).max().unwrap_or(0);
    let ch = images.iter().map(|i| i.height()).max().unwrap_or(0);
    let cols = cols.min(images.len());
    let rows = images.len().div_ceil(cols);
    let mut out = RgbImage::from_pixel(cw * cols as u32, ch * rows as u32, background);
    for (i, img) in images.iter().enumerate() {
        let x = (i % cols) as u32 * cw + (cw - img.width()) / 2;
        let y = (i / cols) as u32 * ch + (ch - img.height()) / 2;
        image::imageops::replace(&mut out, img, x as i64, y as i64);
    }
    Ok(out)
}

/// Images in one row.
pub fn hstack(images: &[RgbImage]) -> Result<RgbImage> {
    grid(images, images.len().max(1))
}
