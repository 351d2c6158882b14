//! The toy's pictures: where its score field points (figure 7) and the frame its panels share.

use candle_core::{Device, Tensor};

use super::data::{Layout, Point};
use super::lab::{Customization, Toy};
use crate::error::{Error, Result};
use crate::util::plot::Frame;

/// The plane every panel of a layout shows.
pub fn frame(layout: Layout) -> Frame {
    let r = match layout {
        Layout::FourPeaks => 3.0,
        Layout::Grid25 => 3.0,
    };
    Frame {
        x: (-r, r),
        y: (-r, r),
    }
}

/// The score `grad log p_t(x | concept) = -eps / sqrt(1 - abar_t)` at timestep `t` on an
/// `n` x `n` grid over the layout's frame, as arrows scaled together so the longest is 0.9 of
/// a grid cell.
pub fn score_field(
    toy: &Toy,
    custom: Option<&Customization>,
    concept: usize,
    t: usize,
    n: usize,
) -> Result<Vec<(Point, Point)>> {
    toy.check_concept(concept)?;
    let steps = toy.schedule().num_train_timesteps();
    if t >= steps {
        return Err(Error::arg(
            "t",
            format!("{t}: the toy's timesteps are 0..{}", steps - 1),
        ));
    }
    if !(2..=64).contains(&n) {
        return Err(Error::arg(
            "grid",
            format!("{n}: from 2 to 64 arrows a side"),
        ));
    }
    let f = frame(toy.layout);
    let at = |i: usize, (a, b): (f32, f32)| a + (b - a) * (i as f32 + 0.5) / n as f32;
    let points: Vec<Point> = (0..n * n)
        .map(|k| [at(k % n, f.x), at(k / n, f.y)])
        .collect();
    let x = Tensor::from_vec(
        points.iter().flatten().copied().collect::<Vec<f32>>(),
        (n * n, 2),
        &Device::Cpu,
    )?;
    let prompts = vec![toy.prompt(concept, None); n * n];
    let eps = toy.eps(custom, &x, &vec![t; n * n], &prompts)?;
    let sigma = (1.0 - toy.schedule().alphas_cumprod()[t]).sqrt();
    let score: Vec<Vec<f32>> = (eps * (-1.0 / sigma as f64))?.to_vec2()?;
    let longest = score
        .iter()
        .map(|v| (v[0] * v[0] + v[1] * v[1]).sqrt())
        .fold(0.0f32, f32::max)
        .max(1e-12);
    let cell = (f.x.1 - f.x.0) / n as f32;
    let k = 0.9 * cell / longest;
    Ok(points
        .into_iter()
        .zip(score)
        .map(|(p, v)| (p, [v[0] * k, v[1] * k]))
        .collect())
}
