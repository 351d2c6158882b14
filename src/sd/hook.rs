//! The attention hook: how a caller observes or changes the attention layers of one UNet call.
//!
//! The caller describes the rows of the batch with a [`BatchLayout`] (which branch, which half
//! of classifier-free guidance, which sample) and passes an [`AttentionHook`]; in every layer the
//! hook [`wants`](AttentionHook::wants), it gets the layer's [`AttentionCall`] (see
//! `attention.rs`) to read or replace probabilities and change values. Layers are addressed by
//! their weight path, never by counting calls, and rows by their layout, never by slicing halves.

use candle_core::{Result, Tensor};

use super::attention::{AttentionCall, LayerInfo};

/// The four linear projections of an attention layer, named as their weights are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Projection {
    Query,
    Key,
    Value,
    Out,
}

impl Projection {
    pub const ALL: [Projection; 4] = [
        Projection::Query,
        Projection::Key,
        Projection::Value,
        Projection::Out,
    ];

    /// The module's name under the layer: `to_q`, `to_k`, `to_v`, `to_out.0`.
    pub fn module(self) -> &'static str {
        match self {
            Projection::Query => "to_q",
            Projection::Key => "to_k",
            Projection::Value => "to_v",
            Projection::Out => "to_out.0",
        }
    }
}

/// Which half of classifier-free guidance a batch row belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Guidance {
    Unconditional,
    Conditional,
}

/// Which branch of a batched run a row belongs to: an opaque tag the caller gives meaning. A
/// method may run several branches side by side in one UNet call (the plain model and a changed
/// one, say) and tell them apart by it; plain generation uses [`Branch::MAIN`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Branch(pub u8);

impl Branch {
    /// The branch of plain generation.
    pub const MAIN: Branch = Branch(0);
}

/// One row of a UNet batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Row {
    pub branch: Branch,
    pub guidance: Guidance,
    /// Index of the image this row belongs to (several images may share a batch).
    pub sample: usize,
}

/// What each row of a UNet batch is. Hooks find rows through it, never by slicing halves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchLayout {
    rows: Vec<Row>,
}

impl BatchLayout {
    pub fn new(rows: Vec<Row>) -> Self {
        Self { rows }
    }

    /// Classifier-free guidance for one image of one branch: `[uncond, cond]`.
    pub fn cfg(branch: Branch) -> Self {
        Self::new(vec![
            Row {
                branch,
                guidance: Guidance::Unconditional,
                sample: 0,
            },
            Row {
                branch,
                guidance: Guidance::Conditional,
                sample: 0,
            },
        ])
    }

    /// `n` rows of one branch and guidance, samples 0..n (e.g. a training batch).
    pub fn uniform(n: usize, branch: Branch, guidance: Guidance) -> Self {
        Self::new(
            (0..n)
                .map(|sample| Row {
                    branch,
                    guidance,
                    sample,
                })
                .collect(),
        )
    }

    /// Appends the rows of `other` after these.
    pub fn concat(&self, other: &BatchLayout) -> Self {
        Self::new(self.rows.iter().chain(&other.rows).copied().collect())
    }

    pub fn rows(&self) -> &[Row] {
        &self.rows
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// A `(rows, 1, 1)` mask, 1 on the rows of `branch`, in `like`'s dtype and device: what a
    /// hook that changes one branch's rows multiplies its change by.
    pub fn branch_mask(&self, branch: Branch, like: &Tensor) -> Result<Tensor> {
        let mask: Vec<f32> = self
            .rows
            .iter()
            .map(|r| if r.branch == branch { 1.0 } else { 0.0 })
            .collect();
        let n = mask.len();
        Tensor::from_vec(mask, (n, 1, 1), like.device())?.to_dtype(like.dtype())
    }

    /// Index of the row with this branch, guidance and sample.
    pub fn find(&self, branch: Branch, guidance: Guidance, sample: usize) -> Option<usize> {
        self.rows
            .iter()
            .position(|r| r.branch == branch && r.guidance == guidance && r.sample == sample)
    }
}

/// The denoising step a UNet call belongs to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Step {
    /// 0-based index of the UNet call in the sampler's plan.
    pub index: usize,
    /// The diffusion timestep (0..num_train_timesteps; fractional for Euler with Karras sigmas).
    pub timestep: f64,
}

/// Where an attention call happens: the layer, the step, the rows, the query grid.
#[derive(Debug, Clone, Copy)]
pub struct AttnSite<'a> {
    pub layer: &'a LayerInfo,
    pub step: Option<Step>,
    pub rows: &'a BatchLayout,
    /// Height and width of the feature map the queries come from (queries are row-major).
    pub spatial: (usize, usize),
}

/// Changes named linear modules outside the attention projections given their input: a
/// low-rank update of a feed-forward layer, of a transformer's 1x1 `proj_in`/`proj_out`, or of a
/// text encoder layer, say. Modules are named by their weight's path without `.weight`
/// (`down_blocks.0.attentions.0.proj_in`, `...transformer_blocks.0.ff.net.2`,
/// `text_model.encoder.layers.0.mlp.fc1`); inputs and outputs come as tokens
/// `(batch, tokens, features)`, 1x1 convolutions' too.
pub trait ModuleHook: Send + Sync {
    /// Whether it changes the module at `path`. Modules not wanted run at no extra cost.
    fn wants_module(&self, path: &str) -> bool;

    /// The module's output to go on with. `rows`: the UNet batch's rows (`None` in the text
    /// encoder, whose batch a caller encodes for one purpose).
    fn module(
        &self,
        path: &str,
        rows: Option<&BatchLayout>,
        input: &Tensor,
        output: Tensor,
    ) -> Result<Tensor>;
}

/// `output` of the module at `path`, changed by `hook` when it wants the module.
pub fn through(
    hook: Option<&dyn ModuleHook>,
    path: &str,
    rows: Option<&BatchLayout>,
    input: &Tensor,
    output: Tensor,
) -> Result<Tensor> {
    match hook {
        Some(h) if h.wants_module(path) => h.module(path, rows, input, output),
        _ => Ok(output),
    }
}

/// A strategy that observes or changes attention. See the module documentation.
pub trait AttentionHook: Send + Sync {
    /// Whether calls of this layer go through [`AttentionHook::attend`]. Layers not wanted run
    /// the plain path at no extra cost.
    fn wants(&self, layer: &LayerInfo) -> bool;

    /// Called once per wanted layer and UNet call, before the values are mixed.
    fn attend(&self, site: &AttnSite<'_>, call: &mut AttentionCall) -> Result<()>;

    /// Called for each projection of a wanted layer with its input and its output
    /// `(batch, tokens, features)`; returns the output the layer goes on with (a low-rank
    /// update, say). The default keeps it.
    fn project(
        &self,
        _site: &AttnSite<'_>,
        _projection: Projection,
        _input: &Tensor,
        output: Tensor,
    ) -> Result<Tensor> {
        Ok(output)
    }

    /// Its changes of the UNet's other linear modules, if any (see [`ModuleHook`]).
    fn modules(&self) -> Option<&dyn ModuleHook> {
        None
    }
}

/// Several hooks as one: a layer is wanted when any of them wants it; each wanting hook attends
/// and projects in turn, in order.
pub struct Chain<'a>(pub Vec<&'a dyn AttentionHook>);

impl AttentionHook for Chain<'_> {
    fn wants(&self, layer: &LayerInfo) -> bool {
        self.0.iter().any(|h| h.wants(layer))
    }

    fn attend(&self, site: &AttnSite<'_>, call: &mut AttentionCall) -> Result<()> {
        for h in self.0.iter().filter(|h| h.wants(site.layer)) {
            h.attend(site, call)?;
        }
        Ok(())
    }

    fn project(
        &self,
        site: &AttnSite<'_>,
        projection: Projection,
        input: &Tensor,
        output: Tensor,
    ) -> Result<Tensor> {
        self.0
            .iter()
            .filter(|h| h.wants(site.layer))
            .try_fold(output, |out, h| h.project(site, projection, input, out))
    }

    fn modules(&self) -> Option<&dyn ModuleHook> {
        self.0
            .iter()
            .any(|h| h.modules().is_some())
            .then_some(self as &dyn ModuleHook)
    }
}

impl ModuleHook for Chain<'_> {
    fn wants_module(&self, path: &str) -> bool {
        self.0
            .iter()
            .filter_map(|h| h.modules())
            .any(|m| m.wants_module(path))
    }

    fn module(
        &self,
        path: &str,
        rows: Option<&BatchLayout>,
        input: &Tensor,
        output: Tensor,
    ) -> Result<Tensor> {
        self.0
            .iter()
            .filter_map(|h| h.modules())
            .try_fold(output, |out, m| through(Some(m), path, rows, input, out))
    }
}

/// A hook with the rows and step of one UNet call.
#[derive(Clone, Copy)]
pub struct HookCtx<'a> {
    pub hook: &'a dyn AttentionHook,
    pub rows: &'a BatchLayout,
    pub step: Option<Step>,
}

impl HookCtx<'_> {
    /// Whether the hook changes the UNet module at `path` (see [`ModuleHook`]).
    pub fn wants_module(&self, path: &str) -> bool {
        self.hook.modules().is_some_and(|m| m.wants_module(path))
    }

    /// `output` of the UNet module at `path`, as the hook changes it.
    pub fn module(&self, path: &str, input: &Tensor, output: Tensor) -> Result<Tensor> {
        through(self.hook.modules(), path, Some(self.rows), input, output)
    }
}
