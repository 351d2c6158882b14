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

/// The smallest size labels shrink to before they wrap: smaller text stops being legible.
pub const MIN_LABEL_PX: f32 = 9.0;
/// Pixels kept free on either side of a label in its cell, so no glyph touches the edge.
const LABEL_MARGIN: u32 = 2;
/// The widest a cell grows to hold a label's longest word whole; a longer word is split.
const MAX_WORD_CELL: u32 = 160;

/// `label` as lines that fit `width` pixels at `px`, broken between words (so "custom (C)"
/// becomes "custom" and "(C)", never "custom (C" and ")"); only a word wider than a whole line
/// is split by characters. Nothing is cut off.
pub fn wrap(label: &str, width: f32, px: f32) -> Vec<String> {
    let fits = |s: &str| measure(s, px).0 <= width;
    let mut lines: Vec<String> = vec![];
    let mut line = String::new();
    for word in label.split_whitespace() {
        let candidate = if line.is_empty() {
            word.to_string()
        } else {
            format!("{line} {word}")
        };
        if fits(&candidate) {
            line = candidate;
            continue;
        }
        if !line.is_empty() {
            lines.push(std::mem::take(&mut line));
        }
        // The word starts a line; one wider than a line goes by characters.
        for ch in word.chars() {
            let candidate = format!("{line}{ch}");
            if !line.is_empty() && !fits(&candidate) {
                lines.push(std::mem::take(&mut line));
                line = ch.to_string();
            } else {
                line = candidate;
            }
        }
    }
    if !line.is_empty() || lines.is_empty() {
        lines.push(line);
    }
    lines
}

/// How labels sit under cells of images `image_w` pixels wide.
struct Labels {
    /// The text size.
    px: f32,
    /// The cell width: the image's, or wider where a label's longest word needs it.
    cell_w: u32,
    /// Each label's lines.
    lines: Vec<Vec<String>>,
    /// Pixels from one line to the next.
    line_h: u32,
}

impl Labels {
    /// The largest size from `start` down to [`MIN_LABEL_PX`] at which every label fits its
    /// cell on one line; below that, labels wrap between words, and a cell grows (up to
    /// [`MAX_WORD_CELL`]) so that the longest word fits whole.
    fn lay_out(labels: &[String], image_w: u32, start: f32) -> Self {
        let room = |w: u32| w.saturating_sub(2 * LABEL_MARGIN) as f32;
        let mut px = start.max(MIN_LABEL_PX);
        while px > MIN_LABEL_PX && labels.iter().any(|l| measure(l, px).0 > room(image_w)) {
            px = (px - 0.5).max(MIN_LABEL_PX);
        }
        let widest_word = labels
            .iter()
            .flat_map(|l| l.split_whitespace())
            .map(|w| measure(w, px).0.ceil() as u32 + 2 * LABEL_MARGIN)
            .max()
            .unwrap_or(0);
        let cell_w = image_w.max(widest_word.min(MAX_WORD_CELL.max(image_w)));
        Self {
            px,
            cell_w,
            lines: labels.iter().map(|l| wrap(l, room(cell_w), px)).collect(),
            line_h: measure("Ag", px).1.ceil() as u32 + 2,
        }
    }

    /// The most lines a label takes.
    fn rows(&self) -> u32 {
        self.lines.iter().map(Vec::len).max().unwrap_or(0) as u32
    }

    /// Draws label `i` centred in the cell whose left edge is `x`, its first line's top at `y`.
    fn draw(&self, out: &mut RgbImage, i: usize, x: u32, y: u32) {
        for (k, l) in self.lines.get(i).into_iter().flatten().enumerate() {
            let w = measure(l, self.px).0.ceil() as i32;
            let lx = x as i32 + ((self.cell_w as i32 - w) / 2).max(LABEL_MARGIN as i32);
            let ly = (y + k as u32 * self.line_h) as i32;
            draw_text(out, l, lx, ly, self.px, Rgb([20, 20, 20]));
        }
    }
}

/// `tiles` in a row on white, 6 pixels apart, each with its whole label centred underneath
/// (see [`Labels::lay_out`]: a cell is wider than its tile where a word needs it); with `bar`,
/// a colour bar of that ramp at the right, its ends labelled "min" and "max" (each tile's map
/// runs from its own minimum to maximum).
pub fn labelled_row(
    tiles: &[(RgbImage, String)],
    bar: Option<&dyn Fn(f32) -> [u8; 3]>,
) -> RgbImage {
    let tw = tiles.iter().map(|(t, _)| t.width()).max().unwrap_or(0);
    let th = tiles.iter().map(|(t, _)| t.height()).max().unwrap_or(0);
    let texts: Vec<String> = tiles.iter().map(|(_, l)| l.clone()).collect();
    let labels = Labels::lay_out(&texts, tw, (tw as f32 / 9.0).clamp(10.0, 16.0));
    let (px, cw) = (labels.px, labels.cell_w);
    let gap = 6;
    let n = tiles.len() as u32;
    let bar_w = if bar.is_some() {
        12 + 4 + measure("max", px).0.ceil() as u32 + 2
    } else {
        0
    };
    let width = (cw + gap) * n.max(1) - gap + if bar.is_some() { gap + bar_w } else { 0 };
    let height = th + 4 + labels.rows().max(1) * labels.line_h;
    let mut out = RgbImage::from_pixel(width, height, Rgb([255, 255, 255]));
    let ink = Rgb([20, 20, 20]);
    for (i, (tile, _)) in tiles.iter().enumerate() {
        let x = i as u32 * (cw + gap);
        image::imageops::replace(&mut out, tile, (x + (cw - tile.width()) / 2) as i64, 0);
        labels.draw(&mut out, i, x, th + 3);
    }
    if let Some(ramp) = bar {
        let x0 = (cw + gap) * n.max(1);
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
/// centred underneath, whole (see [`Labels::lay_out`]: shrunk to fit, then wrapped between
/// words, the cells widened where a word needs it).
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
    let iw = images.iter().map(|i| i.width()).max().unwrap_or(0);
    let ch = images.iter().map(|i| i.height()).max().unwrap_or(0);
    let text = Labels::lay_out(labels, iw, (iw as f32 / 12.0).clamp(10.0, 18.0));
    let cw = if labels.is_empty() { iw } else { text.cell_w };
    let label_h = if labels.is_empty() {
        0
    } else {
        4 + text.line_h * text.rows().max(1)
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
        text.draw(&mut out, i, cx, cy + ch + 2);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The columns of `img` holding label ink (dark pixels) below row `from`.
    fn ink_columns(img: &RgbImage, from: u32) -> Vec<u32> {
        (0..img.width())
            .filter(|&x| (from..img.height()).any(|y| img.get_pixel(x, y).0[0] < 120))
            .collect()
    }

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
        let green: Vec<u32> = (0..row.width())
            .filter(|&x| row.get_pixel(x, 5).0 == [0, 200, 0])
            .collect();
        assert_eq!(green.len(), 32, "the second tile, whole");
        assert_eq!(
            row.get_pixel(green[0] - 1, 5).0,
            [255, 255, 255],
            "white before the second tile"
        );
        // The bar: bright red at the top, dark at the bottom, right of the tiles.
        let bx = (green[31] + 1..row.width())
            .find(|&x| row.get_pixel(x, 0).0[0] > 250 && row.get_pixel(x, 0).0[1] == 0)
            .expect("the bar");
        assert!(row.get_pixel(bx, 31).0[0] < 5);
        // Text under the tiles.
        assert!(!ink_columns(&row, 33).is_empty());

        // A labelled grid: 2 x 2 cells, 4 px apart, labels under each.
        let cells: Vec<RgbImage> = (0..4)
            .map(|_| RgbImage::from_pixel(20, 20, Rgb([0, 0, 0])))
            .collect();
        let labels = ["base", "custom", "base", "custom"].map(String::from);
        let g = labelled_grid(&cells, 2, &labels, 4, Rgb([255, 255, 255])).unwrap();
        assert!(g.width() >= 44);
        assert!(
            g.height() > 2 * 20 + 4 + 2 * 8,
            "room for the labels: {}",
            g.height()
        );
    }

    /// Issue 21, item 10: labels break between words ("custom (C)" is "custom" over "(C)",
    /// never "custom (C" over ")"), and a cell too narrow for a word at a legible size grows
    /// rather than splitting it or letting it run over its edges.
    #[test]
    fn labels_wrap_between_words_and_stay_inside_their_cells() {
        let px = 10.0;
        let custom = measure("custom", px).0;
        let whole = measure("custom (C)", px).0;
        assert_eq!(
            wrap("custom (C)", (custom + whole) / 2.0, px),
            ["custom", "(C)"]
        );
        assert_eq!(
            wrap("a <pot> in the jungle", 1000.0, px),
            ["a <pot> in the jungle"]
        );
        // A word wider than any line still goes whole... by characters, nothing lost.
        let long = wrap("x abcdefghijklmnop", measure("abcd", px).0, px);
        assert_eq!(
            long.concat().replace(' ', ""),
            "xabcdefghijklmnop",
            "{long:?}"
        );

        // 32 px images (the tiny model's): the labels keep a legible size, and each label's
        // ink stays within its own cell (with its margin), clear of the image edges.
        let cells: Vec<RgbImage> = (0..2)
            .map(|_| RgbImage::from_pixel(32, 32, Rgb([255, 255, 255])))
            .collect();
        let labels = ["base (F)", "custom (C)"].map(String::from);
        let g = labelled_grid(&cells, 2, &labels, 4, Rgb([255, 255, 255])).unwrap();
        let cell_w = (g.width() - 4) / 2;
        assert!(
            cell_w >= measure("custom", MIN_LABEL_PX).0 as u32,
            "the cell holds the word whole: {cell_w}"
        );
        let ink = ink_columns(&g, 33);
        assert!(!ink.is_empty());
        assert!(
            ink.iter()
                .all(|&x| (1..cell_w - 1).contains(&x) || (cell_w + 5..2 * cell_w + 3).contains(&x)),
            "ink outside the cells or on their edges: {ink:?} (cells {cell_w} wide)"
        );
        // "custom (C)" takes two lines: "custom" over "(C)".
        let lines = Labels::lay_out(&labels, 32, 10.0);
        assert_eq!(lines.lines[1], ["custom", "(C)"]);
        assert!(lines.px >= MIN_LABEL_PX);

        // A row of attention tiles: "F wooden" under a 32 px tile is not clipped at the
        // image's left edge.
        let row = labelled_row(
            &[
                (
                    RgbImage::from_pixel(32, 32, Rgb([255, 255, 255])),
                    "F wooden".into(),
                ),
                (
                    RgbImage::from_pixel(32, 32, Rgb([255, 255, 255])),
                    "C wooden".into(),
                ),
            ],
            None,
        );
        let ink = ink_columns(&row, 33);
        assert!(
            ink[0] >= 1 && *ink.last().unwrap() < row.width() - 1,
            "{ink:?}"
        );
    }
}
