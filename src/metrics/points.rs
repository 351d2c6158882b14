//! Measures of 2-D point sets (the toy lab's samples): the exact 2-Wasserstein distance of two
//! equal-size sets and how many modes a set covers.

use crate::error::{Error, Result};

/// How many of `centres` are covered: at least 1% of `points` within 3 `std` of it.
pub fn count_modes(points: &[[f32; 2]], centres: &[[f32; 2]], std: f32) -> usize {
    let need = (points.len() as f64 * 0.01).max(1.0);
    centres
        .iter()
        .filter(|c| {
            let near = points
                .iter()
                .filter(|p| ((p[0] - c[0]).powi(2) + (p[1] - c[1]).powi(2)).sqrt() <= 3.0 * std)
                .count();
            near as f64 >= need
        })
        .count()
}

/// The exact 2-Wasserstein distance between two equal-size point sets, each point of weight
/// 1/n: the square root of the mean squared distance of the optimal one-to-one matching (the
/// Hungarian method, pathfinding's Kuhn-Munkres; squared distances in units of 1e-9, O(n³)).
pub fn exact_w2(a: &[[f32; 2]], b: &[[f32; 2]]) -> Result<f64> {
    if a.len() != b.len() || a.is_empty() {
        return Err(Error::arg(
            "points_b",
            format!(
                "the exact W2 matches points one to one: {} and {} points",
                a.len(),
                b.len()
            ),
        ));
    }
    const UNIT: f64 = 1e9;
    let cost = pathfinding::matrix::Matrix::from_fn(a.len(), b.len(), |(i, j)| {
        let (dx, dy) = ((a[i][0] - b[j][0]) as f64, (a[i][1] - b[j][1]) as f64);
        ((dx * dx + dy * dy) * UNIT).round() as i64
    });
    let (total, _) = pathfinding::kuhn_munkres::kuhn_munkres_min(&cost);
    Ok((total as f64 / UNIT / a.len() as f64).sqrt())
}
