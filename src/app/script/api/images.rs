//! Images in scripts: show inline (viuer), save as PNG with metadata, compose, resize.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use image::RgbImage;
use rhai::{Array, Map, INT};

use super::Api;
use crate::app::script::docs::{FnSpec, Kind};
use crate::app::script::{err, rt, Opts, RhaiResult, Session, Thrown};

/// An RGB image, with the text chunks its PNG gets (prompt, seed, ...).
#[derive(Debug, Clone)]
pub struct Img {
    pub rgb: Arc<RgbImage>,
    pub text: Arc<Vec<(&'static str, String)>>,
    /// The file that holds it: where it was last saved or read from (shared by the copies a
    /// script passes around), so that `show` without a terminal names that file instead of
    /// writing another copy.
    file: Arc<std::sync::Mutex<Option<PathBuf>>>,
}

impl Img {
    pub fn new(rgb: RgbImage) -> Self {
        Self::with_text(rgb, vec![])
    }

    pub fn with_text(rgb: RgbImage, text: Vec<(&'static str, String)>) -> Self {
        Self {
            rgb: Arc::new(rgb),
            text: Arc::new(text),
            file: Arc::default(),
        }
    }

    /// Writes it as PNG at `path` and remembers that file.
    pub fn save(&self, path: &Path) -> crate::Result<()> {
        crate::util::image_io::save_png(&self.rgb, path, &self.text)?;
        self.held_in(path);
        Ok(())
    }

    fn held_in(&self, path: &Path) {
        *self.file.lock().unwrap_or_else(|e| e.into_inner()) = Some(path.to_path_buf());
    }

    /// The file that still holds it, if any.
    fn file(&self) -> Option<PathBuf> {
        let file = self.file.lock().unwrap_or_else(|e| e.into_inner()).clone();
        file.filter(|f| f.is_file())
    }
}

impl std::fmt::Display for Img {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Image[{}x{}]", self.rgb.width(), self.rgb.height())
    }
}

fn images_of(arr: Array, func: &str) -> RhaiResult<Vec<Img>> {
    arr.into_iter()
        .enumerate()
        .map(|(i, v)| {
            v.try_cast::<Img>()
                .ok_or_else(|| err(format!("{func}: element {i} is not an image")))
        })
        .collect()
}

/// Refuses a grid of `images` in rows of `cols`, `gap` pixels apart, whose canvas would be
/// past [`crate::util::image_io::MAX_SIDE`] (a huge gap wrapped around `u32` and gave an
/// image) or the machine's memory. Labels are allowed 200 pixels a row.
fn check_grid(func: &str, images: &[Img], cols: usize, gap: usize, labels: bool) -> RhaiResult<()> {
    if cols == 0 || images.is_empty() {
        return Ok(()); // the layout's own error says which
    }
    let cols = cols.min(images.len()) as u64;
    let rows = (images.len() as u64).div_ceil(cols);
    let cw = images.iter().map(|i| i.rgb.width()).max().unwrap_or(0) as u64;
    let ch = images.iter().map(|i| i.rgb.height()).max().unwrap_or(0) as u64;
    let gap = gap as u64;
    let label = if labels { 200 } else { 0 };
    let width = cols.saturating_mul(cw.saturating_add(gap));
    let height = rows.saturating_mul(ch.saturating_add(label).saturating_add(gap));
    rt(canvas(&format!("{func}'s image"), width, height, 3))
}

/// Refuses an image of `width` x `height` pixels past [`crate::util::image_io::MAX_SIDE`] a
/// side, or that the machine's memory cannot hold with its working copies (`copies` bytes a
/// pixel).
fn canvas(what: &str, width: u64, height: u64, copies: u64) -> crate::Result<()> {
    crate::util::image_io::check_canvas(what, width, height)?;
    crate::sd::device::ensure_fits(
        "size",
        &format!("{what} of {width}x{height}"),
        width as u128 * height as u128 * copies as u128,
        &candle_core::Device::Cpu,
    )
}

/// A composite of `images`: it carries the text chunks of the first that has any (the
/// generation it shows), as the web UI's grids carry their first image's parameters.
fn composite(
    images: &[Img],
    make: impl FnOnce(&[RgbImage]) -> crate::Result<RgbImage>,
) -> RhaiResult<Img> {
    let rgb: Vec<RgbImage> = images.iter().map(|i| (*i.rgb).clone()).collect();
    let text = images
        .iter()
        .map(|i| (*i.text).clone())
        .find(|t| !t.is_empty())
        .unwrap_or_default();
    Ok(Img::with_text(rt(make(&rgb))?, text))
}

/// Shows `img` in the terminal (kitty, iTerm or sixel graphics where the terminal has them,
/// half blocks otherwise). When stdout is not a terminal or images are off, the path of a file
/// holding it is printed instead: the one it was saved to or read from, else a copy saved under
/// the session's `infusion-out/`; the terminal is never probed.
pub fn show(session: &Session, img: &Img) -> RhaiResult<()> {
    if session.config.no_images || !std::io::stdout().is_terminal() {
        if let Some(file) = img.file() {
            crate::app::stdout::line_or_say(file.display());
            return Ok(());
        }
        let n = session.shown.fetch_add(1, Ordering::SeqCst);
        let dir = &session.config.out_dir;
        rt(std::fs::create_dir_all(dir).map_err(|e| crate::Error::io(dir, e)))?;
        let path: PathBuf = dir.join(format!("show-{:03}-{}.png", n, std::process::id()));
        rt(img.save(&path))?;
        crate::app::stdout::line_or_say(path.display());
        return Ok(());
    }
    let (cols, rows) = terminal_columns();
    let (width, height) = fit_cells(img.rgb.width(), img.rgb.height(), cols, rows);
    let conf = viuer::Config {
        absolute_offset: false,
        width: Some(width),
        height: Some(height),
        ..Default::default()
    };
    viuer::print(&image::DynamicImage::ImageRgb8((*img.rgb).clone()), &conf)
        .map_err(|e| Thrown::new(crate::ErrorKind::Io, format!("show: {e}")))?;
    Ok(())
}

/// The size in terminal cells to draw a `w` x `h` image at in a `cols` x `rows` pane: as large
/// as the pane allows (two rows left for the prompt), keeping the aspect ratio (a half-block
/// cell is one pixel wide and two tall), but never more cells than pixels.
fn fit_cells(w: u32, h: u32, cols: u32, rows: u32) -> (u32, u32) {
    let (w, h) = (w.max(1) as f64, h.max(1) as f64);
    let max_w = f64::from(cols.saturating_sub(1).max(1));
    let max_h = f64::from(rows.saturating_sub(2).max(1)) * 2.0;
    let scale = (max_w / w).min(max_h / h).min(1.0);
    let width = (w * scale).floor().max(1.0) as u32;
    let height = ((h * scale) / 2.0).ceil().max(1.0) as u32;
    (width, height)
}

fn terminal_columns() -> (u32, u32) {
    match viuer::terminal_size() {
        (w, h) if w > 0 => (w as u32, h as u32),
        _ => (80, 24),
    }
}

fn load_image(path: &str) -> RhaiResult<Img> {
    let img = rt(crate::util::image_io::load_image(Path::new(path)))?;
    let img = Img::new(img);
    img.held_in(Path::new(path));
    Ok(img)
}

fn register_type(api: &mut Api) {
    api.ty::<Img>("Image", "an RGB image, with the text chunks its PNG gets");
    api.get(
        ("Image", "width", "int"),
        "width in pixels",
        |i: &mut Img| i.rgb.width() as INT,
    );
    api.get(
        ("Image", "height", "int"),
        "height in pixels",
        |i: &mut Img| i.rgb.height() as INT,
    );
    let spec = api.declare(
        FnSpec::method("Image", "save")
            .sig("image.save(path) -> path")
            .doc("Writes the image as PNG, atomically, with its text chunks (prompt, seed, steps, concepts where it came from a generation).")
            .example("g.custom.save(\"cat.png\");"),
    );
    api.func(&spec, |i: &mut Img, path: &str| -> RhaiResult<String> {
        rt(i.save(Path::new(path)))?;
        Ok(path.to_string())
    });
    let spec = api.declare(
        FnSpec::method("Image", "resize")
            .sig("image.resize(width, height) -> Image")
            .doc("A resized copy (Catmull-Rom).")
            .example("show(g.custom.resize(128, 128));"),
    );
    api.func(&spec, |i: &mut Img, w: INT, h: INT| -> RhaiResult<Img> {
        if w <= 0 || h <= 0 {
            return Err(err(format!("resize: {w}x{h} is not a size")));
        }
        // The resized image and the filter's intermediate rows, in f32.
        rt(canvas("the resized image", w as u64, h as u64, 3 * 5))?;
        let r = image::imageops::resize(
            &*i.rgb,
            w as u32,
            h as u32,
            image::imageops::FilterType::CatmullRom,
        );
        Ok(Img::with_text(r, (*i.text).clone()))
    });
}

fn register_composition(api: &mut Api, session: &Arc<Session>) {
    let spec = api.declare(
        FnSpec::new("hstack")
            .sig("hstack(images) -> Image")
            .doc("Images side by side.")
            .example("show(hstack([g.base, g.custom]));"),
    );
    api.func(&spec, |arr: Array| -> RhaiResult<Img> {
        let images = images_of(arr, "hstack")?;
        check_grid("hstack", &images, images.len().max(1), 0, false)?;
        composite(&images, crate::util::image_io::hstack)
    });
    let spec = api.declare(
        FnSpec::new("grid")
            .sig("grid(images, cols) -> Image")
            .sig("grid(images, cols, options) -> Image")
            .doc("Images in rows of cols (with options: on white, `gap` pixels apart, each with its label underneath).")
            .opt_unset("labels", Kind::Strings, "one label per image, drawn whole under it")
            .opt("gap", Kind::COUNT, 4 as INT, "pixels between cells")
            .example("show(grid(images, 4));"),
    );
    api.func(&spec, |arr: Array, cols: INT| -> RhaiResult<Img> {
        if cols <= 0 {
            return Err(err(format!("grid: {cols} columns")));
        }
        let images = images_of(arr, "grid")?;
        check_grid("grid", &images, cols as usize, 0, false)?;
        composite(&images, |rgb| {
            crate::util::image_io::grid(rgb, cols as usize)
        })
    });
    let sp = spec.clone();
    api.func(
        &spec,
        move |arr: Array, cols: INT, o: Map| -> RhaiResult<Img> {
            let o = Opts::of(&o, &sp)?;
            if cols <= 0 {
                return Err(err(format!("grid: {cols} columns")));
            }
            let labels = o.strings("labels").unwrap_or_default();
            let gap = o.usize("gap").unwrap_or(4);
            let images = images_of(arr, "grid")?;
            check_grid("grid", &images, cols as usize, gap, !labels.is_empty())?;
            let gap = gap as u32;
            composite(&images, |rgb| {
                crate::util::text_render::labelled_grid(
                    rgb,
                    cols as usize,
                    &labels,
                    gap,
                    image::Rgb([255, 255, 255]),
                )
            })
        },
    );
    let spec = api.declare(
        FnSpec::new("load_image")
            .sig("load_image(path) -> Image")
            .doc("Reads an image file (png, jpg, webp) as RGB.")
            .example("let ref = load_image(\"photos/mycat/1.jpg\");"),
    );
    api.func(&spec, |path: &str| load_image(path));
    let spec = api.declare(
        FnSpec::new("make_dir")
            .sig("make_dir(path) -> path")
            .doc("Makes a folder (and the folders above it) if it does not exist, so that a recipe finds out before its work, not after, whether it can write there.")
            .example("let out = make_dir(\"results/pot\");"),
    );
    api.func(&spec, |path: &str| -> RhaiResult<String> {
        rt(std::fs::create_dir_all(path).map_err(|e| crate::Error::io(path, e)))?;
        Ok(path.to_string())
    });
    let spec = api.declare(
        FnSpec::new("show")
            .sig("show(image)")
            .doc("Draws an image in the terminal (kitty, iTerm or sixel graphics where available, half blocks otherwise). When output is not a terminal or --no-images is set, prints the path of the file holding it (where it was saved or loaded from; an image no file holds is saved under infusion-out/ first).")
            .example("show(g.custom);"),
    );
    let s = session.clone();
    api.func(&spec, move |img: Img| show(&s, &img));
}

pub fn register(api: &mut Api, session: &Arc<Session>) {
    register_type(api);
    register_composition(api, session);
}

#[cfg(test)]
mod tests {
    use super::fit_cells;

    /// The two cases the first-hour tour hit: a small image in a wide pane is drawn a cell per
    /// pixel (not 24 columns for 64 pixels), a large one fits the pane's height.
    #[test]
    fn images_fit_the_pane_at_most_one_cell_per_pixel() {
        assert_eq!(fit_cells(64, 32, 180, 50), (64, 16));
        assert_eq!(fit_cells(512, 512, 180, 50), (96, 48));
        assert_eq!(fit_cells(512, 512, 80, 100), (79, 40));
        assert_eq!(fit_cells(1024, 32, 80, 24), (79, 2));
        assert_eq!(fit_cells(1, 1, 0, 0), (1, 1));
    }
}
