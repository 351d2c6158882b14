//! AdamW with its state out in the open, so checkpoints can hold it and a failed step can be
//! undone whole (parameters and moments). PyTorch's update rule.

use std::collections::BTreeMap;

use candle_core::{Tensor, Var};

use crate::error::Result;

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
            state: AdamState {
                step: 0,
                m: zeros()?,
                v: zeros()?,
            },
        })
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
        let s = &mut self.state;
        s.step += 1;
        let t = s.step as i32;
        let (b1, b2) = (self.beta1, self.beta2);
        let bc1 = 1.0 - b1.powi(t);
        let bc2 = 1.0 - b2.powi(t);
        for (k, var) in vars {
            let g = &grads[k];
            let m = ((&s.m[k] * b1)? + (g * (1.0 - b1))?)?;
            let v = ((&s.v[k] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let decayed = (var.as_tensor() * (1.0 - self.lr * self.weight_decay))?;
            let denom = ((&v / bc2)?.sqrt()? + self.eps)?;
            let update = ((&m / bc1)? / denom)?;
            var.set(&(decayed - (update * self.lr)?)?)?;
            s.m.insert(k.clone(), m);
            s.v.insert(k.clone(), v);
        }
        Ok(())
    }
}
