//! The CLIP text encoder (transformers' `CLIPTextModel`): what SD feeds the UNet is its last
//! hidden state after `final_layer_norm`. Weight names follow the `text_model.` layout of the
//! published files; every size comes from [`TextEncoderConfig`].

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{embedding, Embedding, LayerNorm, VarBuilder};

use crate::sd::hook::{through, ModuleHook};

use crate::sd::config::{TextActivation, TextEncoderConfig};
use crate::sd::nn::{layer_norm, linear, Linear};

pub(crate) struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
    head_dim: usize,
}

/// The sizes of one CLIP encoder layer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LayerDims {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub hidden_act: TextActivation,
    pub layer_norm_eps: f64,
}

impl TextEncoderConfig {
    pub(crate) fn layer_dims(&self) -> LayerDims {
        LayerDims {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_attention_heads: self.num_attention_heads,
            hidden_act: self.hidden_act,
            layer_norm_eps: self.layer_norm_eps,
        }
    }
}

impl ClipAttention {
    fn new(vb: VarBuilder, cfg: &LayerDims) -> candle_core::Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            q_proj: linear(d, d, vb.pp("q_proj"))?,
            k_proj: linear(d, d, vb.pp("k_proj"))?,
            v_proj: linear(d, d, vb.pp("v_proj"))?,
            out_proj: linear(d, d, vb.pp("out_proj"))?,
            heads: cfg.num_attention_heads,
            head_dim: d / cfg.num_attention_heads,
        })
    }

    /// `causal`: the causal mask ([`causal_mask`]) where each token attends to itself and
    /// those before it (the text tower).
    fn forward(
        &self,
        xs: &Tensor,
        causal: Option<&Tensor>,
        hook: Option<(&dyn ModuleHook, &str)>,
    ) -> candle_core::Result<Tensor> {
        let (b, n, d) = xs.dims3()?;
        let lin = |l: &Linear, name: &str, x: &Tensor| hooked(l, hook, "self_attn", name, x);
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let (q, k, v) = (
            lin(&self.q_proj, "q_proj", xs)?,
            lin(&self.k_proj, "k_proj", xs)?,
            lin(&self.v_proj, "v_proj", xs)?,
        );
        // The heads, the scale and the mask inside one op (the per-head products, the mask
        // and the softmax were a dozen small ops per layer).
        if crate::sd::cpu::attention::applies_with_grad(&q, &k, &v) {
            let out = crate::sd::cpu::attention::attention_heads(
                &q,
                &k,
                &v,
                self.heads,
                scale,
                causal.is_some(),
            )?;
            return lin(&self.out_proj, "out_proj", &out);
        }
        let split = |t: Tensor| {
            t.reshape((b, n, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, k, v) = (split((q * scale)?)?, split(k)?, split(v)?);
        let scores = q.matmul(&k.t()?)?;
        let scores = match causal {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let probs =
            crate::sd::nn::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(v.dtype())?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, n, d))?;
        lin(&self.out_proj, "out_proj", &out)
    }
}

/// `l(x)`, changed by the module hook where it wants `LAYER.GROUP.NAME` (`hook`: the hook and
/// the layer's path).
fn hooked(
    l: &Linear,
    hook: Option<(&dyn ModuleHook, &str)>,
    group: &str,
    name: &str,
    x: &Tensor,
) -> candle_core::Result<Tensor> {
    match hook {
        Some((h, layer)) => through(
            Some(h),
            &format!("{layer}.{group}.{name}"),
            None,
            x,
            l.forward(x)?,
        ),
        None => l.forward(x),
    }
}

/// One pre-LN CLIP encoder layer (the text and the vision tower share it).
pub(crate) struct ClipLayer {
    layer_norm1: LayerNorm,
    self_attn: ClipAttention,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: TextActivation,
}

impl ClipLayer {
    pub(crate) fn new(vb: VarBuilder, cfg: &LayerDims) -> candle_core::Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            layer_norm1: layer_norm(d, cfg.layer_norm_eps, vb.pp("layer_norm1"))?,
            self_attn: ClipAttention::new(vb.pp("self_attn"), cfg)?,
            layer_norm2: layer_norm(d, cfg.layer_norm_eps, vb.pp("layer_norm2"))?,
            fc1: linear(d, cfg.intermediate_size, vb.pp("mlp").pp("fc1"))?,
            fc2: linear(cfg.intermediate_size, d, vb.pp("mlp").pp("fc2"))?,
            act: cfg.hidden_act,
        })
    }

    /// `causal`: the causal mask ([`causal_mask`]) where each token attends to itself and
    /// those before it (the text tower); `hook`: a module hook and this layer's path
    /// (`text_model.encoder.layers.N`).
    pub(crate) fn forward(
        &self,
        xs: &Tensor,
        causal: Option<&Tensor>,
        hook: Option<(&dyn ModuleHook, &str)>,
    ) -> candle_core::Result<Tensor> {
        let lin = |l: &Linear, name: &str, x: &Tensor| hooked(l, hook, "mlp", name, x);
        let h =
            self.self_attn
                .forward(&crate::sd::nn::norm(&self.layer_norm1, xs)?, causal, hook)?;
        let xs = (xs + h)?;
        let h = lin(
            &self.fc1,
            "fc1",
            &crate::sd::nn::norm(&self.layer_norm2, &xs)?,
        )?;
        let h = match self.act {
            TextActivation::QuickGelu if crate::sd::cpu::quick_gelu::applies(&h) => {
                crate::sd::cpu::quick_gelu::quick_gelu(&h)?
            }
            TextActivation::QuickGelu => (&h * candle_nn::ops::sigmoid(&(&h * 1.702)?)?)?,
            TextActivation::Gelu => h.gelu_erf()?,
            TextActivation::GeluNew => h.gelu()?,
        };
        xs + lin(&self.fc2, "fc2", &h)?
    }
}

/// CLIP's text transformer with its final layer norm.
pub struct TextEncoder {
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<ClipLayer>,
    final_layer_norm: LayerNorm,
    max_len: usize,
}

impl TextEncoder {
    /// `vb` points at the file's root; the weights live under `text_model.`.
    pub fn new(vb: VarBuilder, cfg: &TextEncoderConfig) -> candle_core::Result<Self> {
        let vb = vb.pp("text_model");
        let emb = vb.pp("embeddings");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| ClipLayer::new(vb.pp("encoder").pp("layers").pp(i), &cfg.layer_dims()))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            token_embedding: embedding(cfg.vocab_size, cfg.hidden_size, emb.pp("token_embedding"))?,
            position_embedding: embedding(
                cfg.max_position_embeddings,
                cfg.hidden_size,
                emb.pp("position_embedding"),
            )?,
            layers,
            final_layer_norm: layer_norm(
                cfg.hidden_size,
                cfg.layer_norm_eps,
                vb.pp("final_layer_norm"),
            )?,
            max_len: cfg.max_position_embeddings,
        })
    }

    /// The number of token positions (77 for SD1.x).
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// `ids`: (batch, n) integer token ids, n <= max_len. Returns (batch, n, hidden).
    pub fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_embeds(&self.embed_tokens(ids)?)
    }

    /// The token embeddings of `ids` (batch, n), before positions are added: (batch, n, hidden).
    /// A caller may change rows (a learned word vector) and pass them to
    /// [`TextEncoder::forward_embeds`].
    pub fn embed_tokens(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        self.token_embedding.forward(ids)
    }

    /// Every linear module of the layers a [`ModuleHook`] can change, by path, with its
    /// weight's shape `[out, in]`.
    pub fn linear_modules(&self) -> Vec<(String, [usize; 2])> {
        let shape = |l: &Linear| {
            let d = l.weight().dims();
            [d[0], d[1]]
        };
        let mut out = vec![];
        for (i, layer) in self.layers.iter().enumerate() {
            let path = format!("text_model.encoder.layers.{i}");
            let a = &layer.self_attn;
            for (name, l) in [
                ("self_attn.q_proj", &a.q_proj),
                ("self_attn.k_proj", &a.k_proj),
                ("self_attn.v_proj", &a.v_proj),
                ("self_attn.out_proj", &a.out_proj),
                ("mlp.fc1", &layer.fc1),
                ("mlp.fc2", &layer.fc2),
            ] {
                out.push((format!("{path}.{name}"), shape(l)));
            }
        }
        out
    }

    /// The width of a token embedding.
    pub fn hidden_size(&self) -> usize {
        self.token_embedding.hidden_size()
    }

    /// The text states of token embeddings `embeds` (batch, n, hidden), n <= max_len.
    pub fn forward_embeds(&self, embeds: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_embeds_with(embeds, None)
    }

    /// [`TextEncoder::forward_embeds`] with `hook` changing the layers' linear modules
    /// (`text_model.encoder.layers.N.self_attn.{q,k,v,out}_proj`, `.mlp.fc1`, `.mlp.fc2`).
    pub fn forward_embeds_with(
        &self,
        embeds: &Tensor,
        hook: Option<&dyn ModuleHook>,
    ) -> candle_core::Result<Tensor> {
        let (_, n, _) = embeds.dims3()?;
        if n > self.max_len {
            candle_core::bail!(
                "{n} token ids, the text encoder takes at most {}",
                self.max_len
            );
        }
        let positions = Tensor::arange(0u32, n as u32, embeds.device())?;
        let xs = embeds.broadcast_add(&self.position_embedding.forward(&positions)?)?;
        let mask = causal_mask(n, xs.dtype(), embeds.device())?;
        let mut xs = xs;
        for (i, layer) in self.layers.iter().enumerate() {
            let path = format!("text_model.encoder.layers.{i}");
            xs = layer.forward(&xs, Some(&mask), hook.map(|h| (h, path.as_str())))?;
        }
        crate::sd::nn::norm(&self.final_layer_norm, &xs)
    }
}

/// `(1, 1, n, n)`: 0 where key `j <= i`, minus infinity after.
pub(crate) fn causal_mask(n: usize, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
    let mask: Vec<f32> = (0..n)
        .flat_map(|i| (0..n).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (n, n), device)?
        .to_dtype(dtype)?
        .unsqueeze(0)?
        .unsqueeze(0)
}
