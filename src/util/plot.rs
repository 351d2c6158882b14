//! Charts drawn with plotters into images (scatter plots, arrow fields, line charts with error
//! bars), every axis with ticks and a title. plotters' bitmap backend draws the shapes; text is
//! rasterized by `text_render` (ab_glyph, the bundled DejaVu Sans), so charts need no system
//! fonts.

use image::RgbImage;
use plotters::prelude::*;
use plotters_backend::text_anchor::{HPos, VPos};
use plotters_backend::{
    BackendColor, BackendCoord, BackendStyle, BackendTextStyle, DrawingErrorKind, FontTransform,
};

use crate::error::{Error, Result};

/// plotters' bitmap backend with text drawn by ab_glyph.
struct Canvas<'a>(BitMapBackend<'a>);

fn measure(text: &str, size: f64) -> (f32, f32, f32) {
    crate::util::text_render::measure(text, size as f32)
}

type Res<E> = std::result::Result<(), DrawingErrorKind<E>>;

impl DrawingBackend for Canvas<'_> {
    type ErrorType = <BitMapBackend<'static> as DrawingBackend>::ErrorType;

    fn get_size(&self) -> (u32, u32) {
        self.0.get_size()
    }
    fn ensure_prepared(&mut self) -> Res<Self::ErrorType> {
        self.0.ensure_prepared()
    }
    fn present(&mut self) -> Res<Self::ErrorType> {
        self.0.present()
    }
    fn draw_pixel(&mut self, p: BackendCoord, c: BackendColor) -> Res<Self::ErrorType> {
        self.0.draw_pixel(p, c)
    }
    fn draw_line<S: BackendStyle>(
        &mut self,
        a: BackendCoord,
        b: BackendCoord,
        s: &S,
    ) -> Res<Self::ErrorType> {
        self.0.draw_line(a, b, s)
    }
    fn draw_rect<S: BackendStyle>(
        &mut self,
        a: BackendCoord,
        b: BackendCoord,
        s: &S,
        fill: bool,
    ) -> Res<Self::ErrorType> {
        self.0.draw_rect(a, b, s, fill)
    }
    fn draw_circle<S: BackendStyle>(
        &mut self,
        c: BackendCoord,
        r: u32,
        s: &S,
        fill: bool,
    ) -> Res<Self::ErrorType> {
        self.0.draw_circle(c, r, s, fill)
    }

    fn draw_text<T: BackendTextStyle>(
        &mut self,
        text: &str,
        style: &T,
        pos: BackendCoord,
    ) -> Res<Self::ErrorType> {
        let color = style.color();
        let (w, h, _) = measure(text, style.size());
        let anchor = style.anchor();
        let dx = match anchor.h_pos {
            HPos::Left => 0.0,
            HPos::Center => -w / 2.0,
            HPos::Right => -w,
        };
        let dy = match anchor.v_pos {
            VPos::Top => 0.0,
            VPos::Center => -h / 2.0,
            VPos::Bottom => -h,
        };
        let rotate = matches!(style.transform(), FontTransform::Rotate270);
        let mut pixels = vec![];
        crate::util::text_render::rasterize(text, style.size() as f32, |gx, gy, coverage| {
            // Glyph pixel in text coordinates (origin at the text's top left).
            let (tx, ty) = (gx as f32 + dx, gy as f32 + dy);
            let (px, py) = if rotate {
                (pos.0 + ty as i32, pos.1 - tx as i32)
            } else {
                (pos.0 + tx as i32, pos.1 + ty as i32)
            };
            pixels.push((px, py, coverage));
        });
        for (px, py, coverage) in pixels {
            let c = BackendColor {
                alpha: color.alpha * coverage as f64,
                rgb: color.rgb,
            };
            self.0.draw_pixel((px, py), c)?;
        }
        Ok(())
    }

    fn estimate_text_size<T: BackendTextStyle>(
        &self,
        text: &str,
        style: &T,
    ) -> std::result::Result<(u32, u32), DrawingErrorKind<Self::ErrorType>> {
        let (w, h, _) = measure(text, style.size());
        Ok(match style.transform() {
            FontTransform::Rotate90 | FontTransform::Rotate270 => {
                (h.ceil() as u32, w.ceil() as u32)
            }
            _ => (w.ceil() as u32, h.ceil() as u32),
        })
    }
}

/// A drawing that failed: every input is checked before drawing, so this is a bug.
fn plot_err(e: impl std::fmt::Display) -> Error {
    Error::Internal(format!("drawing a chart: {e}"))
}

/// Draws into a white `width` x `height` image with `draw`.
fn render(
    width: u32,
    height: u32,
    draw: impl FnOnce(&DrawingArea<Canvas<'_>, plotters::coord::Shift>) -> Result<()>,
) -> Result<RgbImage> {
    if width < 64 || height < 64 {
        return Err(Error::arg(
            "size",
            format!("{width}x{height}: a chart is at least 64x64 pixels"),
        ));
    }
    let mut buf = vec![255u8; width as usize * height as usize * 3];
    {
        let root =
            Canvas(BitMapBackend::with_buffer(&mut buf, (width, height))).into_drawing_area();
        draw(&root)?;
        root.present().map_err(plot_err)?;
    }
    RgbImage::from_raw(width, height, buf).ok_or_else(|| plot_err("the chart's buffer"))
}

/// A palette of distinct colours (the first ones: blue, orange, green, red, purple, ...).
pub const PALETTE: [(u8, u8, u8); 8] = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
];

/// One set of points of a scatter panel.
pub struct Scatter {
    pub label: String,
    pub color: (u8, u8, u8),
    pub points: Vec<[f32; 2]>,
}

/// A panel of a figure: its title and what it shows.
pub struct Panel<T> {
    pub title: String,
    pub content: T,
}

/// Axis ranges of 2-D panels.
#[derive(Debug, Clone, Copy)]
pub struct Frame {
    pub x: (f32, f32),
    pub y: (f32, f32),
}

impl Frame {
    /// Refuses a frame a chart cannot draw: an end that is not a finite number, an end not
    /// below the other, or a span past the largest f32 (its ticks could not be placed).
    pub fn check(&self) -> Result<()> {
        for (axis, (lo, hi)) in [("x", self.x), ("y", self.y)] {
            check_span("range", axis, lo as f64, hi as f64)?;
            if !(hi - lo).is_finite() {
                return Err(Error::arg(
                    "range",
                    format!(
                        "{axis} from {} to {}: a span wider than a chart can draw (at most {:e})",
                        number_text(lo as f64),
                        number_text(hi as f64),
                        f32::MAX
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// A number as an error message shows it: as written for everyday sizes, in exponent form for
/// huge and tiny ones (1e300, not three hundred digits), and `inf` / `NaN` as they are.
pub fn number_text(v: f64) -> String {
    if v == 0.0 || (v.is_finite() && (1e-4..1e6).contains(&v.abs())) {
        format!("{v}")
    } else {
        format!("{v:e}")
    }
}

/// Refuses an axis range (`what`, axis `axis`) whose ends are not finite, not in order, or
/// span more than a float holds: plotters' tick placement never ends on such a range.
fn check_span(what: &str, axis: &str, lo: f64, hi: f64) -> Result<()> {
    if !(lo.is_finite() && hi.is_finite()) {
        return Err(Error::arg(
            what,
            format!(
                "{axis} from {} to {}: the ends must be finite numbers",
                number_text(lo),
                number_text(hi)
            ),
        ));
    }
    if lo >= hi {
        return Err(Error::arg(
            what,
            format!(
                "{axis} from {} to {}: the start must be below the end",
                number_text(lo),
                number_text(hi)
            ),
        ));
    }
    if !(hi - lo).is_finite() {
        return Err(Error::arg(
            what,
            format!(
                "{axis} from {lo:e} to {hi:e}: a span wider than a chart can draw (at most {:e})",
                f64::MAX
            ),
        ));
    }
    Ok(())
}

/// A row of scatter panels sharing `frame`, each `panel_size` pixels, with a legend of the
/// first panel's labels and axes titled x and y.
pub fn scatter_row(
    panels: &[Panel<Vec<Scatter>>],
    frame: Frame,
    panel_size: u32,
    title: &str,
) -> Result<RgbImage> {
    frame.check()?;
    for p in panels {
        for s in &p.content {
            if let Some((k, q)) = s
                .points
                .iter()
                .enumerate()
                .find(|(_, q)| !(q[0].is_finite() && q[1].is_finite()))
            {
                return Err(Error::arg(
                    "points",
                    format!(
                        "`{}`, point {k}: [{}, {}] is not a pair of finite numbers",
                        s.label,
                        number_text(q[0] as f64),
                        number_text(q[1] as f64)
                    ),
                ));
            }
        }
    }
    let img = row(panels.len(), panel_size, title, |area, i| {
        let p = &panels[i];
        let mut chart = axes(area, &p.title, frame)?;
        for s in &p.content {
            let color = RGBColor(s.color.0, s.color.1, s.color.2);
            chart
                .draw_series(
                    s.points
                        .iter()
                        .map(|q| Circle::new((q[0], q[1]), 2, color.filled())),
                )
                .map_err(plot_err)?;
        }
        Ok(())
    })?;
    let entries: Vec<(String, (u8, u8, u8))> = panels[0]
        .content
        .iter()
        .map(|s| (s.label.clone(), s.color))
        .collect();
    Ok(legend_strip(img, &entries))
}

/// `img` with a strip underneath naming each coloured entry (nothing when none has a label):
/// the legend outside the plots, where it covers nothing.
fn legend_strip(img: RgbImage, entries: &[(String, (u8, u8, u8))]) -> RgbImage {
    use crate::util::text_render::{draw_text, measure};
    if entries.iter().all(|(l, _)| l.is_empty()) {
        return img;
    }
    let h = 26;
    let mut out = RgbImage::from_pixel(img.width(), img.height() + h, image::Rgb([255, 255, 255]));
    image::imageops::replace(&mut out, &img, 0, 0);
    let px = 14.0;
    let widths: Vec<u32> = entries
        .iter()
        .map(|(l, _)| 14 + 6 + measure(l, px).0.ceil() as u32 + 18)
        .collect();
    let mut x = (img.width().saturating_sub(widths.iter().sum::<u32>()) / 2) as i32;
    let y = img.height() as i32 + 6;
    for ((label, c), w) in entries.iter().zip(widths) {
        for dy in 0..12 {
            for dx in 0..12 {
                let (px_, py) = ((x + dx) as u32, (y + dy) as u32);
                if px_ < out.width() && py < out.height() {
                    out.put_pixel(px_, py, image::Rgb([c.0, c.1, c.2]));
                }
            }
        }
        draw_text(&mut out, label, x + 18, y - 1, px, image::Rgb([20, 20, 20]));
        x += w as i32;
    }
    out
}

/// An arrow: from a point, by a vector.
pub type Arrow = ([f32; 2], [f32; 2]);

/// An arrow field: arrows from each point by its vector (already scaled), per panel.
pub fn arrows_row(
    panels: &[Panel<Vec<Arrow>>],
    frame: Frame,
    panel_size: u32,
    title: &str,
) -> Result<RgbImage> {
    frame.check()?;
    if panels
        .iter()
        .flat_map(|p| &p.content)
        .any(|(p, v)| !p.iter().chain(v).all(|x| x.is_finite()))
    {
        return Err(Error::arg(
            "arrows",
            "an arrow is not made of finite numbers",
        ));
    }
    row(panels.len(), panel_size, title, |area, i| {
        let mut chart = axes(area, &panels[i].title, frame)?;
        let color = RGBColor(PALETTE[0].0, PALETTE[0].1, PALETTE[0].2);
        // Data units per pixel on each axis, so that heads keep their shape whatever the frame.
        let (px, py) = chart.plotting_area().get_pixel_range();
        let per_px = (
            (frame.x.1 - frame.x.0) / (px.end - px.start).max(1) as f32,
            (frame.y.1 - frame.y.0) / (py.end - py.start).max(1) as f32,
        );
        for (p, v) in &panels[i].content {
            let tip = (p[0] + v[0], p[1] + v[1]);
            chart
                .draw_series(std::iter::once(PathElement::new(
                    vec![(p[0], p[1]), tip],
                    Color::stroke_width(&color, 1),
                )))
                .map_err(plot_err)?;
            if let Some(head) = arrow_head(tip, *v, per_px) {
                chart
                    .draw_series(std::iter::once(Polygon::new(head, color.filled())))
                    .map_err(plot_err)?;
            }
        }
        Ok(())
    })
}

/// The head of an arrow ending at `tip` along `v`: a triangle 6 pixels long (at most 40% of the
/// arrow), 25 degrees each side, in data units given `per_px` (units per pixel on x and y).
/// None for an arrow shorter than a pixel, which gets no head.
fn arrow_head(tip: (f32, f32), v: [f32; 2], per_px: (f32, f32)) -> Option<Vec<(f32, f32)>> {
    let (dx, dy) = (v[0] / per_px.0, v[1] / per_px.1);
    let len = (dx * dx + dy * dy).sqrt();
    if len.is_nan() || len < 1.0 {
        return None;
    }
    let size = (0.4 * len).min(6.0);
    let (ux, uy) = (dx / len, dy / len);
    let (c, s) = (25f32.to_radians().cos(), 25f32.to_radians().sin());
    let side = |sign: f32| {
        // The reversed direction rotated by ±25 degrees, `size` pixels long.
        let (bx, by) = (-ux * c + sign * uy * s, -uy * c - sign * ux * s);
        (tip.0 + bx * size * per_px.0, tip.1 + by * size * per_px.1)
    };
    Some(vec![tip, side(1.0), side(-1.0)])
}

/// A tick label: whole numbers as they are, others to 3 significant digits (exponent form
/// outside [1e-3, 1e5)).
pub fn number_label(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.fract() == 0.0 && v.abs() < 1e9 {
        format!("{}", v as i64)
    } else if !(1e-3..1e5).contains(&v.abs()) {
        format!("{v:.2e}")
    } else {
        let digits = (2 - v.abs().log10().floor() as i32).max(0) as usize;
        format!("{v:.digits$}")
    }
}

/// Tick labels' size in pixels (ab_glyph's scale: ascent to descent, so digits are ~9 pixels
/// tall), read at a glance on the toy's 260-pixel panels.
const TICK_PX: u32 = 14;
/// Axis titles' size in pixels (plotters' default follows the tick labels, which were 11).
const AXIS_TITLE_PX: u32 = 16;

/// One line of a line chart: `(x, y, standard error)` points.
pub struct Line {
    pub label: String,
    pub color: (u8, u8, u8),
    pub points: Vec<(f64, f64, Option<f64>)>,
}

/// The axes' ranges of a line chart: x from the data (one unit wide for a single step), y from
/// the data and its error bars, padded by 10% of the span and never narrower than 10% of the
/// values' size (so that 0.915 -> 0.917 does not look steep); all zeros get -1..1. A value that
/// is not finite, a negative error, or ranges wider than a float holds are refused (plotters
/// would never finish placing their ticks).
fn line_ranges(lines: &[Line]) -> Result<((f64, f64), (f64, f64))> {
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for (i, l) in lines.iter().enumerate() {
        let name = if l.label.is_empty() {
            format!("line {i}")
        } else {
            format!("line {i} (`{}`)", l.label)
        };
        for (k, &(x, y, e)) in l.points.iter().enumerate() {
            let e = e.unwrap_or(0.0);
            let bad = [("x", x), ("y", y), ("err", e)]
                .into_iter()
                .find(|(_, v)| !v.is_finite());
            if let Some((what, v)) = bad {
                return Err(Error::arg(
                    "lines",
                    format!(
                        "{name}, point {k}: {what} = {} is not a finite number",
                        number_text(v)
                    ),
                ));
            }
            if e < 0.0 {
                return Err(Error::arg(
                    "lines",
                    format!("{name}, point {k}: a negative error ({})", number_text(e)),
                ));
            }
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y - e);
            y1 = y1.max(y + e);
        }
    }
    if x0 > x1 {
        return Err(Error::arg("lines", "no point to draw"));
    }
    let size = y0.abs().max(y1.abs());
    let pad = if size < 1e-12 {
        1.0
    } else {
        ((y1 - y0) * 0.1).max(size * 0.05)
    };
    let x_pad = if x0 == x1 {
        (x0.abs() * 0.1).max(1.0)
    } else {
        0.0
    };
    let (px0, px1, py0, py1) = (x0, x1 + x_pad, y0 - pad, y1 + pad);
    let too_wide = |axis: &str, lo: f64, hi: f64| {
        Error::arg(
            "lines",
            format!(
                "{axis} from {lo:e} to {hi:e}: with its margin, a span wider than a chart can \
                 draw (at most {:e})",
                f64::MAX
            ),
        )
    };
    if !(px1 - px0).is_finite() {
        return Err(too_wide("x", x0, x1));
    }
    if !(py1 - py0).is_finite() {
        return Err(too_wide("y", y0, y1));
    }
    check_span("lines", "x", px0, px1)?;
    check_span("lines", "y", py0, py1)?;
    Ok(((px0, px1), (py0, py1)))
}

/// A line chart: the y range from the data (error bars included) padded by 10% (see
/// [`line_ranges`]), ticks and titles on both axes, error bars where a standard error is
/// given, a legend.
pub fn line_chart(
    lines: &[Line],
    (title, x_title, y_title): (&str, &str, &str),
    (width, height): (u32, u32),
) -> Result<RgbImage> {
    let ((x0, x1), (y0, y1)) = line_ranges(lines)?;
    render(width, height, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(46)
            .y_label_area_size(84)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc(x_title)
            .y_desc(y_title)
            .x_labels(6)
            .y_labels(6)
            .x_label_formatter(&|x| number_label(*x))
            .y_label_formatter(&|y| number_label(*y))
            .light_line_style(WHITE)
            .label_style(("sans-serif", TICK_PX))
            .axis_desc_style(("sans-serif", AXIS_TITLE_PX))
            .draw()
            .map_err(plot_err)?;
        for l in lines {
            let color = RGBColor(l.color.0, l.color.1, l.color.2);
            chart
                .draw_series(LineSeries::new(
                    l.points.iter().map(|p| (p.0, p.1)),
                    Color::stroke_width(&color, 2),
                ))
                .map_err(plot_err)?;
            chart
                .draw_series(
                    l.points
                        .iter()
                        .map(|p| Circle::new((p.0, p.1), 3, color.filled())),
                )
                .map_err(plot_err)?;
            for &(x, y, e) in &l.points {
                if let Some(e) = e {
                    chart
                        .draw_series(std::iter::once(PathElement::new(
                            vec![(x, y - e), (x, y + e)],
                            Color::stroke_width(&color, 1),
                        )))
                        .map_err(plot_err)?;
                }
            }
        }
        Ok(())
    })
    .map(|img| {
        let entries: Vec<(String, (u8, u8, u8))> =
            lines.iter().map(|l| (l.label.clone(), l.color)).collect();
        legend_strip(img, &entries)
    })
}

type Chart2d<'a, 'b> = ChartContext<
    'a,
    Canvas<'b>,
    Cartesian2d<plotters::coord::types::RangedCoordf32, plotters::coord::types::RangedCoordf32>,
>;

/// Panels side by side under a title, each drawn by `draw(area, i)`.
fn row(
    n: usize,
    panel_size: u32,
    title: &str,
    mut draw: impl FnMut(&DrawingArea<Canvas<'_>, plotters::coord::Shift>, usize) -> Result<()>,
) -> Result<RgbImage> {
    if n == 0 {
        return Err(Error::arg("panels", "no panel to draw"));
    }
    let head = if title.is_empty() { 0 } else { 30 };
    render(panel_size * n as u32, panel_size + head, |root| {
        let body = if title.is_empty() {
            root.clone()
        } else {
            root.titled(title, ("sans-serif", 20)).map_err(plot_err)?
        };
        for (i, area) in body.split_evenly((1, n)).iter().enumerate() {
            draw(area, i)?;
        }
        Ok(())
    })
}

/// A panel's axes over `frame`: a caption, ticks and the titles x and y.
fn axes<'a, 'b>(
    area: &'a DrawingArea<Canvas<'b>, plotters::coord::Shift>,
    title: &str,
    frame: Frame,
) -> Result<Chart2d<'a, 'b>> {
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 16))
        .margin(8)
        .x_label_area_size(44)
        .y_label_area_size(54)
        .build_cartesian_2d(frame.x.0..frame.x.1, frame.y.0..frame.y.1)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("x")
        .y_desc("y")
        .x_labels(5)
        .y_labels(5)
        .label_style(("sans-serif", TICK_PX))
        .axis_desc_style(("sans-serif", AXIS_TITLE_PX))
        .light_line_style(WHITE)
        .draw()
        .map_err(plot_err)?;
    Ok(chart)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrow_heads_point_back_from_the_tip_and_keep_their_pixel_size() {
        // 0.01 data units per pixel on x, 0.02 on y; an arrow 20 pixels long pointing right.
        let head = arrow_head((1.0, 1.0), [0.2, 0.0], (0.01, 0.02)).unwrap();
        assert_eq!(head[0], (1.0, 1.0));
        for &(x, y) in &head[1..] {
            // 6 pixels back along x (cos 25°), 6 sin 25° pixels to either side on y.
            assert!((x - (1.0 - 6.0 * 25f32.to_radians().cos() * 0.01)).abs() < 1e-5);
            assert!(((y - 1.0).abs() - 6.0 * 25f32.to_radians().sin() * 0.02).abs() < 1e-5);
        }
        assert!(head[1].1 != head[2].1, "the two sides differ");
        // Shorter than a pixel: no head.
        assert!(arrow_head((0.0, 0.0), [0.001, 0.0], (0.01, 0.01)).is_none());
    }

    /// Runs `f` on its own thread and fails, instead of hanging the test run, when it has not
    /// finished in 20 seconds.
    fn within_20s<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(std::time::Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("{what}: still drawing after 20 s (hung)"))
    }

    fn one_line(points: Vec<(f64, f64, Option<f64>)>) -> Result<RgbImage> {
        line_chart(
            &[Line {
                label: "l".into(),
                color: PALETTE[0],
                points,
            }],
            ("", "x", "y"),
            (200, 150),
        )
    }

    /// Issue 21, item 16: a value that is not finite is refused by name, ranges wider than a
    /// float are refused, and huge finite ranges draw; nothing hangs in plotters' ticks.
    #[test]
    fn charts_refuse_non_finite_values_and_never_hang_on_huge_ranges() {
        type Case = (
            &'static str,
            Vec<(f64, f64, Option<f64>)>,
            Option<&'static str>,
        );
        let cases: Vec<Case> = vec![
            (
                "inf y",
                vec![(0.0, 0.0, None), (1.0, f64::INFINITY, None)],
                Some("y = inf is not a finite number"),
            ),
            (
                "NaN x",
                vec![(f64::NAN, 0.0, None), (1.0, 1.0, None)],
                Some("x = NaN"),
            ),
            (
                "inf err",
                vec![(0.0, 0.0, Some(f64::INFINITY)), (1.0, 1.0, None)],
                Some("err = inf"),
            ),
            (
                "y span",
                vec![(0.0, -1e308, None), (1.0, 1e308, None)],
                Some("wider than a chart can draw"),
            ),
            (
                "padded",
                vec![(0.0, 1e307, None), (1.0, 1.7e308, None)],
                Some("wider than a chart can draw"),
            ),
            (
                "x span",
                vec![(-1e308, 0.0, None), (1e308, 1.0, None)],
                Some("wider than a chart can draw"),
            ),
            (
                "err span",
                vec![(0.0, 0.0, Some(1e308)), (1.0, 1.0, Some(1e308))],
                Some("wider than a chart can draw"),
            ),
            ("huge y", vec![(0.0, 0.0, None), (1.0, 1e308, None)], None),
            ("huge x", vec![(0.0, 0.0, None), (1e308, 1.0, None)], None),
            (
                "tiny span",
                vec![(0.0, 1e20, None), (1e-300, 1e20 + 1e5, None)],
                None,
            ),
            ("one point", vec![(1e300, 5.0, None)], None),
        ];
        for (what, points, refused) in cases {
            let r = within_20s(what, move || {
                one_line(points).map(|_| ()).map_err(|e| e.to_string())
            });
            match (refused, r) {
                (Some(says), Err(e)) => assert!(e.contains(says), "{what}: {e}"),
                (None, Ok(())) => {}
                (expected, r) => panic!("{what}: expected {expected:?}, got {r:?}"),
            }
        }
        let scatter = |frame: Frame, p: [f32; 2]| {
            within_20s("scatter", move || {
                scatter_row(
                    &[Panel {
                        title: String::new(),
                        content: vec![Scatter {
                            label: "s".into(),
                            color: PALETTE[0],
                            points: vec![p],
                        }],
                    }],
                    frame,
                    100,
                    "",
                )
                .map(|_| ())
                .map_err(|e| e.to_string())
            })
        };
        let inf = f32::INFINITY;
        let e = scatter(
            Frame {
                x: (0.0, inf),
                y: (0.0, 1.0),
            },
            [0.0, 0.0],
        )
        .unwrap_err();
        assert!(e.contains("finite"), "{e}");
        let e = scatter(
            Frame {
                x: (-3e38, 3e38),
                y: (0.0, 1.0),
            },
            [0.0, 0.0],
        )
        .unwrap_err();
        assert!(e.contains("wider than a chart can draw"), "{e}");
        let e = scatter(
            Frame {
                x: (0.0, 1.0),
                y: (0.0, 1.0),
            },
            [f32::NAN, 0.0],
        )
        .unwrap_err();
        assert!(e.contains("point 0") && e.contains("finite"), "{e}");
        scatter(
            Frame {
                x: (-1e38, 1e38),
                y: (0.0, 1.0),
            },
            [1e37, 0.5],
        )
        .unwrap();
    }

    #[test]
    fn tick_labels_are_short_and_whole_numbers_stay_whole() {
        assert_eq!(number_label(0.12345), "0.123");
        assert_eq!(number_label(1234.0), "1234");
        assert_eq!(number_label(2.5), "2.50");
        assert_eq!(number_label(2.5e-6), "2.50e-6");
        assert_eq!(number_label(0.0), "0");
    }
}
