//! Images in and out: tensors to RGB, PNG files written atomically with text metadata.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use image::RgbImage;

use super::fs::write_atomic;
use crate::error::{Error, Result};
use crate::job::Job;

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
        .ok_or_else(|| Error::Internal(format!("the pixels of a {w}x{h} image do not fill it")))
}

/// `img` as PNG bytes, with `text` as tEXt chunks (keyword, value); `path` is for messages.
pub fn encode_png(img: &RgbImage, path: &Path, text: &[(&str, String)]) -> Result<Vec<u8>> {
    let png_err = |msg: String| Error::Image {
        path: path.to_path_buf(),
        msg,
    };
    let mut bytes = vec![];
    let mut enc = png::Encoder::new(&mut bytes, img.width(), img.height());
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    for (k, v) in text {
        // tEXt holds Latin-1 only; other text (a CJK prompt, an emoji, a model path in any
        // script) goes in an iTXt chunk, UTF-8, which A1111 and PIL read under the same key.
        let latin1 = v.chars().all(|c| (c as u32) < 0x100);
        if latin1 {
            enc.add_text_chunk(k.to_string(), v.clone())
        } else {
            enc.add_itxt_chunk(k.to_string(), v.clone())
        }
        .map_err(|e| png_err(e.to_string()))?;
    }
    let mut writer = enc.write_header().map_err(|e| png_err(e.to_string()))?;
    writer
        .write_image_data(img.as_raw())
        .map_err(|e| png_err(e.to_string()))?;
    writer.finish().map_err(|e| png_err(e.to_string()))?;
    Ok(bytes)
}

/// Saves `img` as PNG at `path` (atomically), with `text` as text chunks (keyword, value; tEXt
/// for Latin-1 text, iTXt for any other).
pub fn save_png(img: &RgbImage, path: &Path, text: &[(&str, String)]) -> Result<()> {
    let bytes = encode_png(img, path, text)?;
    write_atomic(path, |w| {
        w.write_all(&bytes).map_err(|e| Error::io(path, e))
    })
}

/// Images side by side in rows of `cols`, each cell the size of the largest image (smaller ones
/// centred on black).
pub fn grid(images: &[RgbImage], cols: usize) -> Result<RgbImage> {
    grid_on(images, cols, image::Rgb([0, 0, 0]))
}

/// [`grid`] on a background colour.
pub fn grid_on(images: &[RgbImage], cols: usize, background: image::Rgb<u8>) -> Result<RgbImage> {
    crate::util::text_render::labelled_grid(images, cols, &[], 0, background)
}

/// The largest side of an image this tool makes (PNG viewers and the image crate's filters
/// slow to a crawl well before `u32::MAX`; 32768 pixels is a poster at 300 dpi).
pub const MAX_SIDE: u64 = 1 << 15;

/// Refuses an image of `width` x `height` pixels (`what` names it) past [`MAX_SIDE`] a side.
pub fn check_canvas(what: &str, width: u64, height: u64) -> Result<()> {
    if width == 0 || height == 0 || width > MAX_SIDE || height > MAX_SIDE {
        return Err(Error::arg(
            "size",
            format!("{what} would be {width}x{height} pixels: each side is 1 to {MAX_SIDE}"),
        ));
    }
    Ok(())
}

/// Images in one row.
pub fn hstack(images: &[RgbImage]) -> Result<RgbImage> {
    grid(images, images.len().max(1))
}

/// The images of a folder, and the files that looked like images but were skipped.
#[derive(Debug, Default)]
pub struct ImageFolder {
    pub images: Vec<(PathBuf, RgbImage)>,
    /// `path: why` of each file skipped (not a regular file, unreadable).
    pub skipped: Vec<String>,
}

/// Loads the images of a folder (jpg, png, webp; grayscale, RGBA and 16-bit converted to 8-bit
/// RGB, transparency over white), sorted by file name. Only regular files are opened (after
/// following links; a FIFO would block); a file that cannot be read is skipped, as long as one
/// image loads.
pub fn load_folder(folder: &Path) -> Result<ImageFolder> {
    let entries = std::fs::read_dir(folder).map_err(|e| Error::io(folder, e))?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .map(|e| {
                    matches!(
                        e.to_ascii_lowercase().as_str(),
                        "jpg" | "jpeg" | "png" | "webp"
                    )
                })
                .unwrap_or(false)
        })
        .collect();
    paths.sort();
    let mut out = ImageFolder::default();
    for p in paths {
        match load_image(&p) {
            Ok(img) => out.images.push((p, img)),
            Err(e) => out.skipped.push(e.to_string()),
        }
    }
    if out.images.is_empty() {
        let why = if out.skipped.is_empty() {
            "no jpg, png or webp images in this folder".to_string()
        } else {
            format!(
                "no readable image in this folder ({})",
                out.skipped.join("; ")
            )
        };
        // A folder: named as such, not as an image.
        return Err(Error::Format {
            path: folder.to_path_buf(),
            msg: why,
        });
    }
    Ok(out)
}

/// The loss mask of each image of `images` (a folder's, as [`load_folder`] reads them) from
/// `dir`: `STEM.png` for an image `STEM.*`, of the image's size, as gray levels (white counts,
/// black does not). A missing mask, another size or an all-black mask is an error naming it.
pub fn load_masks(images: &[(PathBuf, RgbImage)], dir: &Path) -> Result<Vec<image::GrayImage>> {
    if !dir.is_dir() {
        return Err(Error::arg(
            "masks",
            format!("{}: not a folder of masks", dir.display()),
        ));
    }
    images
        .iter()
        .map(|(path, img)| {
            let stem = path.file_stem().unwrap_or_default();
            let file = dir.join(stem).with_extension("png");
            if !file.is_file() {
                return Err(Error::arg(
                    "masks",
                    format!(
                        "no mask {} for the image {} (one PNG per image, named as it)",
                        file.display(),
                        path.display()
                    ),
                ));
            }
            crate::util::fs::check_regular(&file)?;
            let bad = |msg: String| Error::Image {
                path: file.clone(),
                msg,
            };
            let mask = image::open(&file)
                .map_err(|e| bad(e.to_string()))?
                .to_luma8();
            if mask.dimensions() != img.dimensions() {
                return Err(bad(format!(
                    "a {}x{} mask for the {}x{} image {}",
                    mask.width(),
                    mask.height(),
                    img.width(),
                    img.height(),
                    path.display()
                )));
            }
            if mask.pixels().all(|p| p.0[0] == 0) {
                return Err(bad("all black: the image would not count at all".into()));
            }
            Ok(mask)
        })
        .collect()
}

/// One image file as RGB (transparency over white); only a regular file is opened (after
/// following links; a FIFO would block).
pub fn load_image(path: &Path) -> Result<RgbImage> {
    crate::util::fs::check_regular(path)?;
    let img = image::open(path).map_err(|e| Error::Image {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    Ok(to_rgb_over_white(&img))
}

/// The images of a folder, as [`load_folder`] reads them, without their paths; each file
/// skipped is a warning on `job`.
pub fn load_folder_images(folder: &Path, job: &Job) -> Result<Vec<RgbImage>> {
    let f = load_folder(folder)?;
    for s in &f.skipped {
        job.warn(format!("skipped {s}"));
    }
    Ok(f.images.into_iter().map(|(_, i)| i).collect())
}

fn to_rgb_over_white(img: &image::DynamicImage) -> RgbImage {
    if !img.color().has_alpha() {
        return img.to_rgb8();
    }
    let rgba = img.to_rgba8();
    RgbImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        let p = rgba.get_pixel(x, y).0;
        let a = p[3] as f32 / 255.0;
        let c = |v: u8| (v as f32 * a + 255.0 * (1.0 - a)).round() as u8;
        image::Rgb([c(p[0]), c(p[1]), c(p[2])])
    })
}

/// Resizes the shorter side to `size` and crops the centre square.
pub fn square_crop(img: &RgbImage, size: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    let scale = size as f64 / w.min(h) as f64;
    let (nw, nh) = (
        ((w as f64 * scale).round() as u32).max(size),
        ((h as f64 * scale).round() as u32).max(size),
    );
    let resized = image::imageops::resize(img, nw, nh, image::imageops::FilterType::CatmullRom);
    image::imageops::crop_imm(&resized, (nw - size) / 2, (nh - size) / 2, size, size).to_image()
}

/// An RGB image as a `(1, 3, H, W)` tensor in [-1, 1].
pub fn image_to_tensor(img: &RgbImage, device: &Device) -> Result<Tensor> {
    let (w, h) = img.dimensions();
    let data: Vec<f32> = img
        .as_raw()
        .iter()
        .map(|&v| v as f32 / 127.5 - 1.0)
        .collect();
    Ok(Tensor::from_vec(data, (h as usize, w as usize, 3), device)?
        .permute((2, 0, 1))?
        .unsqueeze(0)?)
}
