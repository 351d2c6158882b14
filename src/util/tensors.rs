//! Small checks on tensors, and plain values out of trained variables.

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

/// The value of `t` as a plain tensor: a copy with its own storage and no gradient history.
///
/// What leaves a training loop must be this. A trained variable's tensor (or anything computed
/// from it) makes every later operation record a backward graph, so a generation with it keeps
/// every activation of every step alive (gigabytes at 32x32); a detached view alone still shares
/// the variable's storage, so the next update would change it under its holder.
pub fn plain(t: &Tensor) -> Result<Tensor> {
    Ok(t.detach().copy()?)
}

/// [`plain`] of every variable, by name.
pub fn plain_values(
    vars: &std::collections::BTreeMap<String, candle_core::Var>,
) -> Result<std::collections::BTreeMap<String, Tensor>> {
    vars.iter()
        .map(|(k, v)| Ok((k.clone(), plain(v.as_tensor())?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// A plain value records no operation, and a later update of the variable leaves it alone.
    #[test]
    fn plain_values_are_detached_and_owned() {
        let var = Var::new(&[1f32, 2.0], &Device::Cpu).unwrap();
        let vars = std::collections::BTreeMap::from([("x".to_string(), var.clone())]);
        let values = plain_values(&vars).unwrap();
        let x = &values["x"];
        assert!(var.as_tensor().track_op());
        assert!(!x.track_op(), "a plain value must not track gradients");
        assert!(!(x * 2.0).unwrap().track_op());
        var.set(&Tensor::new(&[5f32, 6.0], &Device::Cpu).unwrap())
            .unwrap();
        assert_eq!(x.to_vec1::<f32>().unwrap(), vec![1.0, 2.0]);
        // What the bug was: a same-device `to_device` or a `copy` of the variable still tracks.
        assert!(var.as_tensor().to_device(&Device::Cpu).unwrap().track_op());
        assert!(var.as_tensor().copy().unwrap().track_op());
    }
}
