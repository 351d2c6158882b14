//! Text on images, rasterized with ab_glyph from the bundled DejaVu Sans (no system fonts), and
//! rows of labelled tiles (the attention maps) with an optional colour bar.

use std::sync::OnceLock;

use ab_glyph::{Font, FontRef, PxScale, ScaleFont};
use image::{Rgb, RgbImage};

static FONT_BYTES: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

/// The bundled font.
pub fn font() -> &'static FontRef<'static> {
    static FONT: OnceLock<FontRef<'static>> = OnceLock::new();
    FONT.get_or_init(|| FontRef::try_from_slice(FONT_BYTES).expect("the bundled font parses"))
}

/// Width, height and the distance from the top to the baseline of `text` at `px` pixels.
pub fn measure(text: &str, px: f32) -> (f32, f32, f32) {
    let f = font().as_scaled(PxScale::from(px));
    let w: f32 = text.chars().map(|c| f.h_advance(f.glyph_id(c))).sum();
    (w, f.ascent() - f.descent(), f.ascent())
}

/// Calls `put(x, y, coverage)` for each pixel of `text` at `px` pixels, its top left at the
/// origin.
pub fn rasterize(text: &str, px: f32, mut put: impl FnMut(i32, i32, f32)) {
    let f = font().as_scaled(PxScale::from(px));
    let ascent = f.ascent();
    let mut x = 0.0f32;
    for ch in text.chars() {
        let id = f.glyph_id(ch);
        let glyph = id.with_scale_and_position(f.scale(), ab_glyph::point(x, ascent));
        x += f.h_advance(id);
        if let Some(outline) = font().outline_glyph(glyph) {
            let b = outline.px_bounds();
            outline.draw(|gx, gy, c| {
                if c > 0.05 {
                    put(
                        b.min.x as i32 + gx as i32,
                        b.min.y as i32 + gy as i32,
                        c.min(1.0),
                    );
                }
            });
        }
    }
}

/// Draws `text` with its top left at `(x, y)`, `px` pixels high, blended onto the image.
pub fn draw_text(img: &mut RgbImage, text: &str, x: i32, y: i32, px: f32, color: Rgb<u8>) {
    let (w, h) = (img.width() as i32, img.height() as i32);
    rasterize(text, px, |gx, gy, c| {
        let (px_, py) = (x + gx, y + gy);
        if px_ >= 0 && py >= 0 && px_ < w && py < h {
            let p = img.get_pixel_mut(px_ as u32, py as u32);
            for k in 0..3 {
                p[k] = (p[k] as f32 * (1.0 - c) + color[k] as f32 * c).round() as u8;
            }
        }
    });
}

/// `label` as lines that fit `width` pixels at `px`: whole words where they fit, a word wider
/// than a line split by characters (nothing is cut off).
pub fn wrap(label: &str, width: f32, px: f32) -> Vec<String> {
    let mut lines: Vec<String> = vec![];
    let mut line = String::new();
    for ch in label.chars() {
        let candidate = format!("{line}{ch}");
        if !line.is_empty() && measure(&candidate, px).0 > width {
            lines.push(std::mem::take(&mut line));
            line = ch.to_string();
        } else {
            line = candidate;
        }
    }
    if !line.is_empty() || lines.is_empty() {
        lines.push(line);
    }
    lines
}

/// `tiles` in a row on white, 6 pixels apart, each with its whole label centred underneath
/// (wrapped when it is wider than the tile); with `bar`, a colour bar of that ramp at the right,
/// its ends labelled "min" and "max" (each tile's map runs from its own minimum to maximum).
pub fn labelled_row(
    tiles: &[(RgbImage, String)],
    bar: Option<&dyn Fn(f32) -> [u8; 3]>,
) -> RgbImage {
    let tw = tiles.iter().map(|(t, _)| t.width()).max().unwrap_or(0);
    let th = tiles.iter().map(|(t, _)| t.height()).max().unwrap_or(0);
    // The largest size (from tw/9, 10 to 16 px, down to 7) at which every label fits on one
    // line; labels still wider wrap.
    let mut px = (tw as f32 / 9.0).clamp(10.0, 16.0);
    while px > 7.0 && tiles.iter().any(|(_, l)| measure(l, px).0 > tw as f32) {
        px -= 0.5;
    }
    let line_h = (measure("Ag", px).1).ceil() as u32 + 2;
    let wrapped: Vec<Vec<String>> = tiles
        .iter()
        .map(|(_, l)| wrap(l, tw.max(1) as f32, px))
        .collect();
    let lines = wrapped.iter().map(Vec::len).max().unwrap_or(1) as u32;
    let gap = 6;
    let n = tiles.len() as u32;
    let bar_w = if bar.is_some() {
        12 + gap + measure("max", px).0.ceil() as u32 + 4
    } else {
        0
    };
    let width = (tw + gap) * n.max(1) - gap + if bar.is_some() { gap + bar_w } else { 0 };
    let mut out = RgbImage::from_pixel(width, th + 4 + lines * line_h, Rgb([255, 255, 255]));
    let ink = Rgb([20, 20, 20]);
    for (i, ((tile, _), text)) in tiles.iter().zip(&wrapped).enumerate() {
        let x = i as u32 * (tw + gap);
        image::imageops::replace(&mut out, tile, x as i64, 0);
        for (k, l) in text.iter().enumerate() {
            let lx = x as i32 + (tw as i32 - measure(l, px).0.round() as i32) / 2;
            draw_text(
                &mut out,
                l,
                lx,
                (th + 3 + k as u32 * line_h) as i32,
                px,
                ink,
            );
        }
    }
    if let Some(ramp) = bar {
        let x0 = (tw + gap) * n.max(1) - gap + gap;
        for y in 0..th {
            let c = ramp(1.0 - y as f32 / (th.max(2) - 1) as f32);
            for x in x0..x0 + 12 {
                out.put_pixel(x, y, Rgb(c));
            }
        }
        draw_text(&mut out, "max", (x0 + 16) as i32, 0, px, ink);
        let low_y = th as i32 - measure("min", px).1.ceil() as i32;
        draw_text(&mut out, "min", (x0 + 16) as i32, low_y, px, ink);
    }
    out
}

/// Images in rows of `cols` on `background`, `gap` pixels apart, each cell the size of the
/// largest image (smaller ones centred), each with its label (when `labels` has one for it)
/// centred underneath, whole (shrunk to fit, then wrapped).
pub fn labelled_grid(
    images: &[RgbImage],
    cols: usize,
    labels: &[String],
    gap: u32,
    background: Rgb<u8>,
) -> crate::error::Result<RgbImage> {
    use crate::error::Error;
    if images.is_empty() {
        return Err(Error::arg("images", "no images to put in a grid"));
    }
    if cols == 0 {
        return Err(Error::arg("cols", "must be at least 1"));
    }
    let cw = images.iter().map(|i| i.width()).max().unwrap_or(0);
    let ch = images.iter().map(|i| i.height()).max().unwrap_or(0);
    let mut px = (cw as f32 / 12.0).clamp(10.0, 18.0);
    while px > 7.0 && labels.iter().any(|l| measure(l, px).0 > cw as f32) {
        px -= 0.5;
    }
    let line_h = measure("Ag", px).1.ceil() as u32 + 2;
    let wrapped: Vec<Vec<String>> = labels.iter().map(|l| wrap(l, cw as f32, px)).collect();
    let label_h = if labels.is_empty() {
        0
    } else {
        4 + line_h * wrapped.iter().map(Vec::len).max().unwrap_or(1) as u32
    };
    let cols = cols.min(images.len());
    let rows = images.len().div_ceil(cols) as u32;
    let (cell_w, cell_h) = (cw + gap, ch + label_h + gap);
    let mut out = RgbImage::from_pixel(cell_w * cols as u32 - gap, cell_h * rows - gap, background);
    for (i, img) in images.iter().enumerate() {
        let (cx, cy) = ((i % cols) as u32 * cell_w, (i / cols) as u32 * cell_h);
        let x = cx + (cw - img.width()) / 2;
        let y = cy + (ch - img.height()) / 2;
        image::imageops::replace(&mut out, img, x as i64, y as i64);
        for (k, l) in wrapped.get(i).into_iter().flatten().enumerate() {
            let lx = cx as i32 + (cw as i32 - measure(l, px).0.round() as i32) / 2;
            let ly = (cy + ch + 2 + k as u32 * line_h) as i32;
            draw_text(&mut out, l, lx, ly, px, Rgb([20, 20, 20]));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Labels are whole (a long one wraps, nothing is cut); tiles sit apart on white; the
    /// colour bar runs from the ramp's low end at the bottom to its high end at the top.
    #[test]
    fn labels_are_whole_and_the_colour_bar_runs_up() {
        let mut img = RgbImage::from_pixel(60, 20, Rgb([255, 255, 255]));
        draw_text(&mut img, "A", 0, 0, 14.0, Rgb([255, 0, 0]));
        assert!(img.pixels().any(|p| p.0[0] > 200 && p.0[1] < 60));
        let lines = wrap("teapotteapotteapot", 40.0, 12.0);
        assert!(
            lines.len() > 1 && lines.concat() == "teapotteapotteapot",
            "{lines:?}"
        );
        let ramp = |v: f32| [(v * 255.0) as u8, 0, 0];
        let row = labelled_row(
            &[
                (RgbImage::from_pixel(32, 32, Rgb([0, 0, 200])), "cat".into()),
                (
                    RgbImage::from_pixel(32, 32, Rgb([0, 200, 0])),
                    "a very long token".into(),
                ),
            ],
            Some(&ramp),
        );
        assert_eq!(row.get_pixel(40, 5).0, [0, 200, 0]);
        assert_eq!(
            row.get_pixel(34, 5).0,
            [255, 255, 255],
            "the gap between tiles"
        );
        // The bar: bright red at the top, dark at the bottom.
        let bx = 32 + 6 + 32 + 6 + 2;
        assert!(row.get_pixel(bx, 0).0[0] > 250 && row.get_pixel(bx, 31).0[0] < 5);
        // Text under the tiles.
        assert!((33..row.height()).any(|y| (0..70).any(|x| row.get_pixel(x, y).0[0] < 100)));

        // A labelled grid: 2 x 2 cells of 20 px, 4 px apart, labels under each.
        let cells: Vec<RgbImage> = (0..4)
            .map(|_| RgbImage::from_pixel(20, 20, Rgb([0, 0, 0])))
            .collect();
        let labels = ["base", "custom", "base", "custom"].map(String::from);
        let g = labelled_grid(&cells, 2, &labels, 4, Rgb([255, 255, 255])).unwrap();
        assert_eq!(g.width(), 44);
        assert_eq!(g.get_pixel(22, 5).0, [255, 255, 255], "the gap");
        assert!(
            g.height() > 2 * 20 + 4 + 2 * 8,
            "room for the labels: {}",
            g.height()
        );
    }
}
