//! Small line charts (the over-training curves), drawn with the bitmap font.

use image::{Rgb, RgbImage};

use crate::util::text_render::{draw_text, text_width};

const BG: Rgb<u8> = Rgb([255, 255, 255]);
const AXIS: Rgb<u8> = Rgb([120, 120, 120]);
const INK: Rgb<u8> = Rgb([30, 30, 30]);
const LINE: Rgb<u8> = Rgb([31, 119, 180]);

fn dot(img: &mut RgbImage, x: i64, y: i64, r: i64, c: Rgb<u8>) {
    for dy in -r..=r {
        for dx in -r..=r {
            let (px, py) = (x + dx, y + dy);
            if px >= 0 && py >= 0 && (px as u32) < img.width() && (py as u32) < img.height() {
                img.put_pixel(px as u32, py as u32, c);
            }
        }
    }
}

fn line(img: &mut RgbImage, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: Rgb<u8>) {
    let steps = (x1 - x0).abs().max((y1 - y0).abs()).max(1);
    for i in 0..=steps {
        let x = x0 + (x1 - x0) * i / steps;
        let y = y0 + (y1 - y0) * i / steps;
        dot(img, x, y, 1, c);
    }
}

/// A compact number label: 3 significant digits, exponent form outside [1e-3, 1e5).
pub fn label(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if !(1e-3..1e5).contains(&v.abs()) {
        format!("{v:.2e}")
    } else {
        let digits = (2 - v.abs().log10().floor() as i32).max(0) as usize;
        format!("{v:.digits$}")
    }
}

/// A line chart of `ys` over `xs` with a title, the y range and the x values as ticks.
pub fn line_chart(title: &str, xs: &[f64], ys: &[f64], width: u32, height: u32) -> RgbImage {
    let mut img = RgbImage::from_pixel(width, height, BG);
    let (left, right, top, bottom) = (64i64, 12i64, 22i64, 26i64);
    let (w, h) = (width as i64, height as i64);
    draw_text(&mut img, title, 6, 6, 1, INK);
    line(&mut img, (left, top), (left, h - bottom), AXIS);
    line(&mut img, (left, h - bottom), (w - right, h - bottom), AXIS);
    let pts: Vec<(f64, f64)> = xs
        .iter()
        .zip(ys)
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .map(|(&x, &y)| (x, y))
        .collect();
    if pts.is_empty() {
        draw_text(
            &mut img,
            "no data",
            (left + 8) as u32,
            (h / 2) as u32,
            1,
            INK,
        );
        return img;
    }
    let (xmin, xmax) = pts
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (mut ymin, mut ymax) = pts
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    if ymax - ymin < 1e-12 {
        let pad = if ymax.abs() > 0.0 {
            ymax.abs() * 0.1
        } else {
            1.0
        };
        ymin -= pad;
        ymax += pad;
    }
    let sx = |x: f64| {
        if xmax > xmin {
            left + 6 + ((x - xmin) / (xmax - xmin) * (w - right - left - 12) as f64).round() as i64
        } else {
            (left + w - right) / 2
        }
    };
    let sy = |y: f64| {
        top + 4 + ((ymax - y) / (ymax - ymin) * (h - bottom - top - 8) as f64).round() as i64
    };
    for (v, y) in [(ymax, sy(ymax)), (ymin, sy(ymin))] {
        let t = label(v);
        let tx = (left - 4 - text_width(&t, 1) as i64).max(0);
        draw_text(&mut img, &t, tx as u32, (y - 4).max(0) as u32, 1, INK);
        line(&mut img, (left - 3, y), (left, y), AXIS);
    }
    let mut last_end = i64::MIN;
    for &(x, _) in &pts {
        let t = if x.fract() == 0.0 && x.abs() < 1e9 {
            format!("{}", x as i64)
        } else {
            label(x)
        };
        let px = sx(x);
        let tx = px - text_width(&t, 1) as i64 / 2;
        if tx > last_end + 4 {
            draw_text(
                &mut img,
                &t,
                tx.max(0) as u32,
                (h - bottom + 8) as u32,
                1,
                INK,
            );
            last_end = tx + text_width(&t, 1) as i64;
        }
        line(&mut img, (px, h - bottom), (px, h - bottom + 3), AXIS);
    }
    for pair in pts.windows(2) {
        line(
            &mut img,
            (sx(pair[0].0), sy(pair[0].1)),
            (sx(pair[1].0), sy(pair[1].1)),
            LINE,
        );
    }
    for &(x, y) in &pts {
        dot(&mut img, sx(x), sy(y), 2, LINE);
    }
    img
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rising_series_is_drawn_rising() {
        let img = line_chart("w2", &[0.0, 100.0, 200.0], &[0.0, 1.0, 2.0], 240, 160);
        // The line's colour appears low on the left and high on the right.
        let rows_with_line = |x: u32| {
            (0..160)
                .filter(|&y| img.get_pixel(x, y) == &LINE)
                .collect::<Vec<_>>()
        };
        let left = rows_with_line(71);
        let right = rows_with_line(221);
        assert!(!left.is_empty() && !right.is_empty());
        assert!(left[0] > right[0], "left {left:?} right {right:?}");
        assert_eq!(label(0.12345), "0.123");
        assert_eq!(label(1234.0), "1234");
        assert_eq!(label(2.5e-6), "2.50e-6");
    }
}
