//! C's noise prediction on a batch of noisy latents, each with its own prompt, for any method's
//! concepts: what the Fisher divergence compares with F's. Rows whose prompt names no concept
//! run the plain model (so F vs C is exactly 0 on them); rows with Infusion's residuals run F and
//! then C with F's recorded maps ([`eps_pair`]); rows with the other methods' concepts run C's
//! own text, hooks and UNet ([`super::side`]), a row at a time.

use candle_core::Tensor;

use super::prompt::place_concepts;
use super::set::ConceptSet;
use super::side::{custom_side, model_side, side_marks, CustomSide};
use crate::error::{Error, Result};
use crate::infusion::hook::{eps_pair, SampleEdit};
use crate::methods::CustomConcept;
use crate::sd::hook::{BatchLayout, Branch, Chain, Guidance, HookCtx};
use crate::sd::pipeline::StableDiffusion;
use crate::sd::unet::UNet;

/// Which prediction [`custom_eps`] makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Apply {
    /// F's: the plain model on the prompts with the class words.
    Plain,
    /// C's: the concepts applied to the rows whose prompt names them.
    Named,
    /// C's, and on the other rows the concepts' changes to the model (see
    /// [`super::side::model_side`]): the customized model the paper's overfitting measures use.
    Everywhere,
}

/// The noise prediction of each row `(prompt, z_t (1, C, h, w), timestep)` through `unet`, as
/// `apply` says. Marks are read against `concepts` either way.
pub fn custom_eps(
    sd: &StableDiffusion,
    unet: &UNet,
    concepts: &ConceptSet,
    rows: &[(&str, &Tensor, usize)],
    apply: Apply,
) -> Result<Tensor> {
    let customized = apply != Apply::Plain;
    let z_t = Tensor::cat(&rows.iter().map(|r| r.1).collect::<Vec<_>>(), 0)?;
    let ts: Vec<usize> = rows.iter().map(|r| r.2).collect();
    let parsed = rows
        .iter()
        .map(|r| concepts.parse(r.0))
        .collect::<Result<Vec<_>>>()?;
    let tokens = parsed
        .iter()
        .map(|p| sd.tokenize(&p.base))
        .collect::<Result<Vec<_>>>()?;
    let ctx = sd.text_states(&tokens.iter().collect::<Vec<_>>())?;
    let t = Tensor::new(
        ts.iter().map(|&t| t as f32).collect::<Vec<_>>(),
        sd.device(),
    )?;
    let z = z_t.to_dtype(sd.dtype())?;
    if !customized {
        return Ok(unet.forward(&z, &t, &ctx, None)?);
    }
    let placements = parsed
        .iter()
        .zip(&tokens)
        .map(|(p, tok)| place_concepts(concepts, p, tok))
        .collect::<Result<Vec<_>>>()?;
    let infusion = if placements.iter().all(|p| p.is_empty()) {
        unet.forward(&z, &t, &ctx, None)?
    } else {
        let edits: Vec<SampleEdit<'_>> = placements
            .iter()
            .map(|row| {
                row.iter()
                    .filter_map(|p| Some((p.positions.as_slice(), p.deltas()?)))
                    .collect()
            })
            .collect();
        // F's pass (which gives C its maps) is the plain prediction.
        let (plain, custom) = eps_pair(sd, &z, &ts, &ctx, &edits)?;
        // Rows without concepts keep the plain prediction, exactly.
        let rows = placements
            .iter()
            .enumerate()
            .map(|(r, p)| {
                if p.is_empty() {
                    plain.get(r)
                } else {
                    custom.get(r)
                }
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::stack(&rows, 0)?
    };
    // Rows with the other methods' concepts: C's own text, hooks and UNet, a row at a time.
    let mut out = (0..rows.len())
        .map(|r| Ok(infusion.get(r)?))
        .collect::<Result<Vec<_>>>()?;
    for (r, p) in parsed.iter().enumerate() {
        let marks = side_marks(concepts, p);
        if marks.is_empty() {
            if apply == Apply::Everywhere && p.marks.is_empty() {
                let all: Vec<&dyn CustomConcept> = concepts.iter().map(|c| c.as_ref()).collect();
                let side = model_side(sd, &p.base, &all, Branch(1))?;
                if let Some(one) = c_row(sd, unet, &side, &ctx, &z, &t, r)? {
                    out[r] = one;
                }
            }
            continue;
        }
        if !placements[r].is_empty() {
            return Err(Error::arg(
                "prompts",
                format!(
                    "{:?} mixes Infusion concepts with other methods' in one prompt",
                    rows[r].0
                ),
            ));
        }
        let side = custom_side(sd, &p.base, "", &marks, Branch(1))?;
        if let Some(one) = c_row(sd, unet, &side, &ctx, &z, &t, r)? {
            out[r] = one;
        }
    }
    Ok(Tensor::stack(&out, 0)?)
}

/// Row `r`'s prediction through C's `side` (its text, hooks and UNet); `None` when the side
/// changes nothing (the plain prediction stands).
fn c_row(
    sd: &StableDiffusion,
    unet: &UNet,
    side: &CustomSide,
    ctx: &Tensor,
    z: &Tensor,
    t: &Tensor,
    r: usize,
) -> Result<Option<Tensor>> {
    if side.states.is_none() && side.hooks.is_empty() && side.unet.is_none() {
        return Ok(None);
    }
    let cond = match &side.states {
        Some(s) => s.to_dtype(sd.dtype())?,
        None => ctx.get(r)?.unsqueeze(0)?,
    };
    let hooks = Chain(side.hooks.iter().map(|h| h.as_ref()).collect());
    let layout = BatchLayout::uniform(1, Branch(1), Guidance::Conditional);
    let hook = HookCtx {
        hook: &hooks,
        rows: &layout,
        step: None,
    };
    let c_unet = side.unet.as_deref().unwrap_or(unet);
    let one = c_unet.forward(
        &z.get(r)?.unsqueeze(0)?,
        &t.get(r)?.unsqueeze(0)?,
        &cond,
        (!hooks.0.is_empty()).then_some(&hook),
    )?;
    Ok(Some(one.squeeze(0)?))
}
