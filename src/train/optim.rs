//! AdamW with its state out in the open, so checkpoints can hold it and a failed step can be
//! undone whole (parameters and moments). PyTorch's update rule.

use std::collections::BTreeMap;

use candle_core::{Tensor, Var};

use crate::error::Result;

/// Each variable's gradient from a backward pass, divided by `scale` (a loss scale; 1 for
/// none), zero for a variable the loss does not reach: what [`AdamW::update`] takes.
pub fn gradients(
    grads: &candle_core::backprop::GradStore,
    vars: &BTreeMap<String, Var>,
    scale: f64,
) -> Result<BTreeMap<String, Tensor>> {
    vars.iter()
        .map(|(k, v)| {
            let g = match grads.get(v.as_tensor()) {
                Some(g) if scale == 1.0 => g.clone(),
                Some(g) => (g / scale)?,
                None => v.as_tensor().zeros_like()?,
            };
            Ok((k.clone(), g))
        })
        .collect()
}

/// Scales `grads` so that their total L2 norm is at most `max` (PyTorch's `clip_grad_norm_`:
/// by `max / (norm + 1e-6)` when that is below 1); returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut BTreeMap<String, Tensor>, max: f64) -> Result<f64> {
    let mut total = 0f64;
    for g in grads.values() {
        total += g
            .to_dtype(candle_core::DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?;
    }
    let norm = total.sqrt();
    let coef = max / (norm + 1e-6);
    if coef < 1.0 {
        for g in grads.values_mut() {
            *g = (&*g * coef)?;
        }
    }
    Ok(norm)
}

/// The optimizer state: the step count and both moments per parameter.
#[derive(Debug, Clone)]
pub struct AdamState {
    pub step: usize,
    pub m: BTreeMap<String, Tensor>,
    pub v: BTreeMap<String, Tensor>,
}

#[derive(Debug)]
pub struct AdamW {
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    /// Learning-rate multiples by parameter (1 for those not named).
    lr_scales: BTreeMap<String, f64>,
    state: AdamState,
}

impl AdamW {
    /// Betas (0.9, 0.999) and eps 1e-8, as PyTorch's defaults; zero moments.
    pub fn new(lr: f64, weight_decay: f64, vars: &BTreeMap<String, Var>) -> Result<Self> {
        let zeros = || -> Result<BTreeMap<String, Tensor>> {
            vars.iter()
                .map(|(k, v)| Ok((k.clone(), v.zeros_like()?)))
                .collect()
        };
        Ok(Self {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            lr_scales: BTreeMap::new(),
            state: AdamState {
                step: 0,
                m: zeros()?,
                v: zeros()?,
            },
        })
    }

    /// Changes the learning rate (a schedule's step).
    pub fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }

    /// Trains parameter `k` at `scale` x the learning rate (its decay too, as a PyTorch
    /// parameter group with its own lr).
    pub fn set_lr_scale(&mut self, k: &str, scale: f64) {
        self.lr_scales.insert(k.to_string(), scale);
    }

    pub fn state(&self) -> &AdamState {
        &self.state
    }

    /// Replaces the state (from a checkpoint, or to undo a step).
    pub fn set_state(&mut self, state: AdamState) {
        self.state = state;
    }

    /// One update of every variable with its gradient.
    pub fn update(
        &mut self,
        vars: &BTreeMap<String, Var>,
        grads: &BTreeMap<String, Tensor>,
    ) -> Result<()> {
        let t = self.state.step + 1;
        for (k, var) in vars {
            let (value, m, v) = self.next(t, k, var.as_tensor(), &grads[k])?;
            var.set(&value)?;
            self.state.m.insert(k.clone(), m);
            self.state.v.insert(k.clone(), v);
        }
        self.state.step = t;
        Ok(())
    }

    /// Whether the next [`AdamW::update`] keeps every parameter finite: it is computed one
    /// parameter at a time and nothing is kept (no copy of the parameters needed).
    pub fn keeps_finite(
        &self,
        vars: &BTreeMap<String, Var>,
        grads: &BTreeMap<String, Tensor>,
    ) -> Result<bool> {
        for (k, var) in vars {
            let (value, _, _) = self.next(self.state.step + 1, k, var.as_tensor(), &grads[k])?;
            if !crate::util::tensors::all_finite(&value)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Parameter `k`'s value and moments after update number `t`.
    fn next(
        &self,
        t: usize,
        k: &str,
        param: &Tensor,
        g: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let s = &self.state;
        let (b1, b2) = (self.beta1, self.beta2);
        let bc1 = 1.0 - b1.powi(t as i32);
        let bc2 = 1.0 - b2.powi(t as i32);
        let m = ((&s.m[k] * b1)? + (g * (1.0 - b1))?)?;
        let v = ((&s.v[k] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
        let lr = self.lr * self.lr_scales.get(k).copied().unwrap_or(1.0);
        let decayed = (param * (1.0 - lr * self.weight_decay))?;
        let denom = ((&v / bc2)?.sqrt()? + self.eps)?;
        let update = ((&m / bc1)? / denom)?;
        Ok(((decayed - (update * lr)?)?, m, v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// PyTorch's rule: a norm over the limit is scaled to it (by max / (norm + 1e-6)), one below
    /// is left alone; the norm returned is the one before.
    #[test]
    fn gradients_are_clipped_to_the_norm_asked() {
        let t = |v: &[f32]| Tensor::new(v, &Device::Cpu).unwrap();
        let mut g = BTreeMap::from([("a".to_string(), t(&[3.0])), ("b".to_string(), t(&[4.0]))]);
        let norm = clip_grad_norm(&mut g, 1.0).unwrap();
        assert_eq!(norm, 5.0);
        let a = g["a"].to_vec1::<f32>().unwrap()[0] as f64;
        assert!((a - 3.0 / (5.0 + 1e-6)).abs() < 1e-7, "{a}");
        let mut small = BTreeMap::from([("a".to_string(), t(&[0.3]))]);
        clip_grad_norm(&mut small, 1.0).unwrap();
        assert_eq!(small["a"].to_vec1::<f32>().unwrap(), vec![0.3]);
    }
}
