//! Text on images with an 8x8 bitmap font (labels under attention tiles).

use image::{Rgb, RgbImage};

/// Draws `text` (ASCII; other characters as `?`) at `(x, y)` with each font pixel `scale` pixels.
pub fn draw_text(img: &mut RgbImage, text: &str, x: u32, y: u32, scale: u32, color: Rgb<u8>) {
    use font8x8::UnicodeFonts;
    for (i, ch) in text.chars().enumerate() {
        let glyph = font8x8::BASIC_FONTS
            .get(ch)
            .or_else(|| font8x8::BASIC_FONTS.get('?'))
            .unwrap_or([0; 8]);
        let x0 = x + i as u32 * 8 * scale;
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..8u32 {
                if bits & (1 << col) == 0 {
                    continue;
                }
                for dy in 0..scale {
                    for dx in 0..scale {
                        let (px, py) = (x0 + col * scale + dx, y + row as u32 * scale + dy);
                        if px < img.width() && py < img.height() {
                            img.put_pixel(px, py, color);
                        }
                    }
                }
            }
        }
    }
}

/// Width in pixels of `text` drawn at `scale`.
pub fn text_width(text: &str, scale: u32) -> u32 {
    text.chars().count() as u32 * 8 * scale
}

/// `tiles` in a row, each with its label centred underneath on a dark strip.
pub fn labelled_row(tiles: &[(RgbImage, String)]) -> RgbImage {
    let tw = tiles.iter().map(|(t, _)| t.width()).max().unwrap_or(0);
    let th = tiles.iter().map(|(t, _)| t.height()).max().unwrap_or(0);
    let scale = if tw >= 128 { 2 } else { 1 };
    let label_h = 8 * scale + 6;
    let gap = 2;
    let n = tiles.len() as u32;
    let mut out =
        RgbImage::from_pixel((tw + gap) * n.max(1) - gap, th + label_h, Rgb([16, 16, 16]));
    for (i, (tile, label)) in tiles.iter().enumerate() {
        let x = i as u32 * (tw + gap);
        image::imageops::replace(&mut out, tile, x as i64, 0);
        let max_chars = (tw / (8 * scale)).max(1) as usize;
        let text: String = label.chars().take(max_chars).collect();
        let lx = x + (tw.saturating_sub(text_width(&text, scale))) / 2;
        draw_text(&mut out, &text, lx, th + 3, scale, Rgb([235, 235, 235]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_marks_pixels_and_labels_sit_under_tiles() {
        let mut img = RgbImage::new(40, 10);
        draw_text(&mut img, "A", 0, 0, 1, Rgb([255, 0, 0]));
        assert!(img.pixels().any(|p| p.0 == [255, 0, 0]));
        let row = labelled_row(&[
            (RgbImage::from_pixel(32, 32, Rgb([0, 0, 200])), "cat".into()),
            (RgbImage::from_pixel(32, 32, Rgb([0, 200, 0])), "hat".into()),
        ]);
        assert_eq!(row.dimensions(), (66, 32 + 14));
        assert_eq!(row.get_pixel(40, 5).0, [0, 200, 0]);
        assert!((32..46).any(|y| (0..32).any(|x| row.get_pixel(x, y).0 == [235, 235, 235])));
    }
}
