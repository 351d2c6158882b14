//! Small checks on tensors.

use candle_core::{DType, Tensor};

use crate::error::Result;

/// True when every value of `t` is finite (no NaN, no infinity).
pub fn all_finite(t: &Tensor) -> Result<bool> {
    let s = t
        .abs()?
        .sum_all()?
        .to_dtype(DType::F32)?
        .to_scalar::<f32>()?;
    // A sum of finite values can still overflow to infinity: look closer before blaming.
    if s.is_finite() {
        return Ok(true);
    }
    let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    Ok(v.iter().all(|x| x.is_finite()))
}
