//! The toy denoiser: `eps(x_t, t, prompt)` for 2-D points, a miniature of SD's UNet in what the
//! methods touch. The point and the timestep make a hidden state; one cross-attention layer
//! reads the prompt's token embeddings (the query from the hidden state, keys and values from
//! the tokens); an MLP turns the result into the noise estimate.
//!
//! Parameters live in a name -> tensor map, so one forward pass serves training (tensors that
//! are `Var`s), evaluation and every method's change ([`Edit`]).

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, D};
use rand::Rng;

use crate::error::Result;
use crate::util::noise::normal;

/// The hidden width.
pub const WIDTH: usize = 64;

/// The parameters' names and shapes (weights are `[out, in]`, as candle's and PyTorch's
/// linears).
pub fn shapes(vocab: usize) -> Vec<(&'static str, Vec<usize>)> {
    let d = WIDTH;
    vec![
        ("embed", vec![vocab, d]),
        ("x_in.weight", vec![d, 2]),
        ("x_in.bias", vec![d]),
        ("t_in.weight", vec![d, d]),
        ("t_in.bias", vec![d]),
        ("hidden.weight", vec![d, d]),
        ("hidden.bias", vec![d]),
        ("attn.to_q", vec![d, d]),
        ("attn.to_k", vec![d, d]),
        ("attn.to_v", vec![d, d]),
        ("attn.to_out", vec![d, d]),
        ("mlp.weight", vec![d, d]),
        ("mlp.bias", vec![d]),
        ("out.weight", vec![2, d]),
        ("out.bias", vec![2]),
    ]
}

/// Fresh parameters: weights ~ N(0, 1/fan_in), biases zero, embeddings N(0, 1).
pub fn init(vocab: usize, rng: &mut impl Rng) -> Result<BTreeMap<String, Tensor>> {
    shapes(vocab)
        .into_iter()
        .map(|(name, shape)| {
            let t = if name.ends_with("bias") {
                Tensor::zeros(shape.as_slice(), DType::F32, &Device::Cpu)?
            } else {
                let scale = if name == "embed" {
                    1.0
                } else {
                    1.0 / (shape[1] as f64).sqrt()
                };
                (normal(rng, &shape, &Device::Cpu)? * scale)?
            };
            Ok((name.to_string(), t))
        })
        .collect()
}

/// How a method changes a forward pass.
#[derive(Default)]
pub struct Edit<'a> {
    /// Infusion: this residual `(WIDTH,)` is added to the value of the prompt's first token (the
    /// concept's) in the rows marked true.
    pub delta: Option<(&'a Tensor, &'a [bool])>,
    /// Infusion's C: these attention probabilities `(b, 1, tokens)` (F's) instead of its own.
    pub probs: Option<&'a Tensor>,
    /// Textual Inversion: this vector `(WIDTH,)` is the learned token's embedding.
    pub word: Option<&'a Tensor>,
}

fn linear(x: &Tensor, p: &BTreeMap<String, Tensor>, name: &str) -> Result<Tensor> {
    let y = x.broadcast_matmul(&p[&format!("{name}.weight")].t()?)?;
    Ok(y.broadcast_add(&p[&format!("{name}.bias")])?)
}

/// Sinusoidal embeddings `(b, WIDTH)` of the timesteps.
fn time_embedding(t: &[usize]) -> Result<Tensor> {
    let half = WIDTH / 2;
    let mut out = Vec::with_capacity(t.len() * WIDTH);
    for &t in t {
        for i in 0..half {
            let f = (-(10000f64.ln()) * i as f64 / half as f64).exp();
            out.push((t as f64 * f).sin() as f32);
        }
        for i in 0..half {
            let f = (-(10000f64.ln()) * i as f64 / half as f64).exp();
            out.push((t as f64 * f).cos() as f32);
        }
    }
    Ok(Tensor::from_vec(out, (t.len(), WIDTH), &Device::Cpu)?)
}

/// The noise estimate `(b, 2)` for points `x` `(b, 2)` at timesteps `t`, prompts `tokens`
/// `(b, n)` (u32), with parameters `p` and the method's `edit`; also the attention
/// probabilities `(b, 1, n)` it used.
pub fn forward(
    p: &BTreeMap<String, Tensor>,
    x: &Tensor,
    t: &[usize],
    tokens: &Tensor,
    edit: &Edit<'_>,
) -> Result<(Tensor, Tensor)> {
    let (b, n) = tokens.dims2()?;
    let temb = linear(&time_embedding(t)?, p, "t_in")?.silu()?;
    let h = (linear(x, p, "x_in")? + temb)?.silu()?;
    let h = linear(&h, p, "hidden")?.silu()?;
    // The prompt's embeddings, with the learned word's row replaced.
    let table = match edit.word {
        Some(w) => {
            let v = p["embed"].dim(0)?;
            Tensor::cat(&[p["embed"].narrow(0, 0, v - 1)?, w.unsqueeze(0)?], 0)?
        }
        None => p["embed"].clone(),
    };
    let e = table
        .index_select(&tokens.flatten_all()?, 0)?
        .reshape((b, n, WIDTH))?;
    let q = h.matmul(&p["attn.to_q"].t()?)?.unsqueeze(1)?;
    let k = e.broadcast_matmul(&p["attn.to_k"].t()?)?;
    let mut v = e.broadcast_matmul(&p["attn.to_v"].t()?)?;
    let probs = match edit.probs {
        Some(probs) => probs.clone(),
        None => {
            let scores = (q.matmul(&k.transpose(1, 2)?)? / (WIDTH as f64).sqrt())?;
            candle_nn::ops::softmax(&scores, D::Minus1)?
        }
    };
    if let Some((delta, rows)) = edit.delta {
        let mask: Vec<f32> = (0..b * n)
            .map(|i| if i % n == 0 && rows[i / n] { 1.0 } else { 0.0 })
            .collect();
        let mask = Tensor::from_vec(mask, (b, n, 1), &Device::Cpu)?;
        v = (v + mask.broadcast_mul(&delta.reshape((1, 1, WIDTH))?)?)?;
    }
    let a = probs.matmul(&v)?.squeeze(1)?;
    let h = (h + a.matmul(&p["attn.to_out"].t()?)?)?;
    let h = (linear(&h, p, "mlp")?.silu()? + h)?;
    Ok((linear(&h, p, "out")?, probs))
}
