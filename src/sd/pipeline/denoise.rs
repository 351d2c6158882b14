//! Denoise: the sampler's loop with classifier-free guidance over any number of trajectories
//! from one initial noise, batched in one UNet call per step (one per UNet when some branches
//! run through another), with an optional attention hook.

use candle_core::{DType, Tensor};

use super::latents::StepNoise;
use super::{finite, GenerateOptions, StableDiffusion};
use crate::error::{Error, Result};
use crate::job::Job;
use crate::sd::hook::{AttentionHook, BatchLayout, Branch, Guidance, HookCtx, Row, Step};
use crate::sd::sampler::SamplerState;
use crate::sd::unet::UNet;

/// One trajectory of a batched denoising run: its branch (a tag the caller gives meaning), its
/// sample index and its text states.
#[derive(Debug, Clone)]
pub struct Trajectory {
    pub branch: Branch,
    pub sample: usize,
    /// `(1, tokens, width)` text states of the negative prompt and of the prompt.
    pub uncond: Tensor,
    pub cond: Tensor,
}

/// What the denoising loop reports after each step.
pub struct StepReport<'a> {
    pub step: Step,
    /// The raw UNet output of the step, rows as the batch layout says.
    pub unet_out: &'a Tensor,
    /// Per trajectory: the guided noise prediction used, and the latents after the step.
    pub guided_eps: &'a [Tensor],
    pub latents: &'a [Tensor],
}

/// One denoising run: the trajectories to take from one initial noise, with the generation's
/// settings (steps, guidance, sampler), and optionally an attention hook and other UNets for
/// some branches.
#[derive(Clone, Copy)]
pub struct Denoise<'a> {
    /// Standard-normal initial latents `(1, C, h, w)`; the sampler scales them.
    pub init: &'a Tensor,
    pub trajectories: &'a [Trajectory],
    pub options: &'a GenerateOptions,
    /// Sees every attention layer of every UNet call.
    pub hook: Option<&'a dyn AttentionHook>,
    /// Branches whose rows go through these UNets (of this model's config: a fine-tuned copy,
    /// say) instead of the model's own.
    pub unets: &'a [(Branch, &'a UNet)],
}

impl<'a> Denoise<'a> {
    /// The trajectories from `init` with `options`, through the model's UNet, no hook.
    pub fn new(
        init: &'a Tensor,
        trajectories: &'a [Trajectory],
        options: &'a GenerateOptions,
    ) -> Self {
        Self {
            init,
            trajectories,
            options,
            hook: None,
            unets: &[],
        }
    }

    pub fn hook(self, hook: Option<&'a dyn AttentionHook>) -> Self {
        Self { hook, ..self }
    }

    pub fn unets(self, unets: &'a [(Branch, &'a UNet)]) -> Self {
        Self { unets, ..self }
    }
}

/// The rows of a run's UNet calls, `[uncond, cond]` per trajectory, and their text states.
struct Batch {
    layout: BatchLayout,
    context: Tensor,
}

impl StableDiffusion {
    /// Runs the sampler of `run.options` (steps, guidance, scheduler) with classifier-free
    /// guidance for every trajectory from the same initial noise, batched as `[uncond, cond]`
    /// per trajectory in one UNet call per step (and UNet). Trajectories share the plan and,
    /// for the samplers that add noise, each step's noise per sample index, so F and C stay
    /// aligned; each keeps its own multistep history. Returns the final latents of each
    /// trajectory (f32). `on_step` sees every step.
    pub fn denoise(
        &self,
        run: &Denoise<'_>,
        job: &Job,
        on_step: &mut dyn FnMut(&StepReport<'_>) -> Result<()>,
    ) -> Result<Vec<Tensor>> {
        let (trajectories, opts) = (run.trajectories, run.options);
        let plan = self.plan(opts)?;
        if trajectories.is_empty() {
            return Err(Error::arg("trajectories", "nothing to denoise"));
        }
        let batch = self.batch(trajectories)?;
        let init =
            (run.init.to_device(&self.device)?.to_dtype(DType::F32)? * plan.init_noise_sigma())?;
        let mut latents: Vec<Tensor> = vec![init; trajectories.len()];
        let mut states: Vec<SamplerState> = trajectories.iter().map(|_| plan.state()).collect();
        let mut noise = StepNoise::new(opts, plan.options().kind.needs_noise());
        let bar = job.bar(plan.len(), "denoise");
        for (index, &t) in plan.timesteps().iter().enumerate() {
            job.check()?;
            let step = Step { index, timestep: t };
            let input = latents
                .iter()
                .map(|z| Ok(plan.scale_input(index, z)?.to_dtype(self.dtype)?))
                .collect::<Result<Vec<_>>>()?;
            let input = Tensor::cat(&input.iter().flat_map(|z| [z, z]).collect::<Vec<_>>(), 0)?;
            let out = self.unet_calls(run, &batch, &input, step)?;
            let mut guided = Vec::with_capacity(latents.len());
            let steps = plan.len();
            for (i, (z, state)) in latents.iter_mut().zip(&mut states).enumerate() {
                let u = out.get(2 * i)?.unsqueeze(0)?;
                let c = out.get(2 * i + 1)?.unsqueeze(0)?;
                let eps = (&u + ((c - &u)? * opts.guidance)?)?;
                let n = noise.get(index, trajectories[i].sample, z)?;
                *z = plan.step(state, index, &eps, z, n.as_ref())?;
                finite(z, || {
                    format!(
                        "the latents became NaN or infinite at denoising step {} of {steps} \
                         (timestep {t}): the UNet's prediction was not finite (its weights, or a \
                         dtype too narrow?)",
                        index + 1
                    )
                })?;
                guided.push(eps);
            }
            on_step(&StepReport {
                step,
                unet_out: &out,
                guided_eps: &guided,
                latents: &latents,
            })?;
            bar.inc(1);
        }
        bar.finish_and_clear();
        Ok(latents)
    }

    /// The rows `[uncond, cond]` of each trajectory and their text states, in the working dtype.
    fn batch(&self, trajectories: &[Trajectory]) -> Result<Batch> {
        let rows: Vec<Row> = trajectories
            .iter()
            .flat_map(|t| {
                [Guidance::Unconditional, Guidance::Conditional].map(|guidance| Row {
                    branch: t.branch,
                    guidance,
                    sample: t.sample,
                })
            })
            .collect();
        let context = Tensor::cat(
            &trajectories
                .iter()
                .flat_map(|t| [&t.uncond, &t.cond])
                .collect::<Vec<_>>(),
            0,
        )?
        .to_dtype(self.dtype)?;
        Ok(Batch {
            layout: BatchLayout::new(rows),
            context,
        })
    }

    /// One step's UNet output for every row of the batch: each group of rows whose branch has
    /// a UNet in `run.unets` through it, the rest through the model's own.
    fn unet_calls(
        &self,
        run: &Denoise<'_>,
        batch: &Batch,
        input: &Tensor,
        step: Step,
    ) -> Result<Tensor> {
        let t = Tensor::new(step.timestep as f32, &self.device)?;
        let unet_of = |branch: Branch| -> &UNet {
            run.unets
                .iter()
                .find(|(b, _)| *b == branch)
                .map_or(&self.unet, |(_, u)| *u)
        };
        let call = |unet: &UNet, x: &Tensor, c: &Tensor, rows: &BatchLayout| -> Result<Tensor> {
            let ctx = run.hook.map(|hook| HookCtx {
                hook,
                rows,
                step: Some(step),
            });
            Ok(unet.forward(x, &t, c, ctx.as_ref())?)
        };
        let layout = &batch.layout;
        // Rows grouped by the UNet they go through, in order of first use.
        let mut group_unets: Vec<&UNet> = vec![];
        let group_of: Vec<usize> = layout
            .rows()
            .iter()
            .map(|r| {
                let u = unet_of(r.branch);
                match group_unets.iter().position(|g| std::ptr::eq(*g, u)) {
                    Some(i) => i,
                    None => {
                        group_unets.push(u);
                        group_unets.len() - 1
                    }
                }
            })
            .collect();
        if group_unets.len() == 1 {
            return call(group_unets[0], input, &batch.context, layout);
        }
        let mut out: Vec<Option<Tensor>> = vec![None; group_of.len()];
        for (g, unet) in group_unets.iter().enumerate() {
            let rows: Vec<usize> = (0..group_of.len()).filter(|&r| group_of[r] == g).collect();
            let idx = Tensor::new(
                rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
                input.device(),
            )?;
            let sub = BatchLayout::new(rows.iter().map(|&r| layout.rows()[r]).collect());
            let o = call(
                unet,
                &input.index_select(&idx, 0)?,
                &batch.context.index_select(&idx, 0)?,
                &sub,
            )?;
            for (i, &r) in rows.iter().enumerate() {
                out[r] = Some(o.get(i)?);
            }
        }
        let rows = out
            .into_iter()
            .map(|o| {
                o.ok_or_else(|| Error::Internal("a row of the batch went through no UNet".into()))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::stack(&rows, 0)?)
    }
}
