//! Tensors in scripts: latents, attention maps, anything read from or written to safetensors.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use rhai::{Array, Dynamic, Map, FLOAT, INT};

use super::Api;
use crate::app::script::docs::FnSpec;
use crate::app::script::{err, rt, RhaiResult, Thrown};

/// A tensor value (cheap to clone).
#[derive(Debug, Clone)]
pub struct TensorVal(pub Arc<Tensor>);

impl TensorVal {
    pub fn new(t: Tensor) -> Self {
        Self(Arc::new(t))
    }

    fn f32(&self) -> RhaiResult<Tensor> {
        rt(self
            .0
            .to_device(&Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F32))
            .map_err(Into::into))
    }

    fn reduce(&self, f: impl Fn(&Tensor) -> candle_core::Result<Tensor>) -> RhaiResult<FLOAT> {
        let t = self.f32()?;
        let v = t
            .flatten_all()
            .and_then(|x| f(&x))
            .and_then(|r| r.to_scalar::<f32>());
        rt(v.map(|v| v as FLOAT).map_err(Into::into))
    }
}

impl std::fmt::Display for TensorVal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor{:?} {:?}", self.0.dims(), self.0.dtype())
    }
}

fn load_tensors(path: &str) -> RhaiResult<Map> {
    let t = rt(crate::sd::weights::load_safetensors(
        Path::new(path),
        &Device::Cpu,
    ))?;
    Ok(t.into_iter()
        .map(|(k, v)| (k.into(), Dynamic::from(TensorVal::new(v))))
        .collect())
}

fn save_tensors(map: Map, path: &str) -> RhaiResult<()> {
    let mut out: HashMap<String, Tensor> = HashMap::new();
    for (k, v) in map {
        let t = v
            .try_cast::<TensorVal>()
            .ok_or_else(|| err(format!("save_tensors: `{k}` is not a tensor")))?;
        out.insert(k.to_string(), (*t.0).clone());
    }
    let mut sorted: Vec<(String, Tensor)> = out.into_iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let bytes = safetensors::serialize(sorted, None)
        .map_err(|e| Thrown::new(crate::ErrorKind::Internal, format!("save_tensors: {e}")))?;
    let p = Path::new(path);
    rt(crate::util::fs::write_atomic(p, |w| {
        w.write_all(&bytes).map_err(|e| crate::Error::io(p, e))
    }))
}

fn method(
    name: &'static str,
    sig: &'static str,
    doc: &'static str,
    example: &'static str,
) -> FnSpec {
    FnSpec::method("Tensor", name)
        .sig(sig)
        .doc(doc)
        .example(example)
}

pub fn register(api: &mut Api) {
    api.ty::<TensorVal>(
        "Tensor",
        "a tensor: latents, maps, anything read from safetensors",
    );
    api.get(
        ("Tensor", "shape", "array"),
        "its dimensions",
        |t: &mut TensorVal| -> Array {
            t.0.dims()
                .iter()
                .map(|&d| Dynamic::from(d as INT))
                .collect()
        },
    );
    api.get(
        ("Tensor", "dtype", "string"),
        "its element type (f32, f16, ...)",
        |t: &mut TensorVal| format!("{:?}", t.0.dtype()).to_lowercase(),
    );
    let spec = api.declare(method(
        "mean",
        "tensor.mean() -> float",
        "The mean of every value of a tensor.",
        "print(g.custom_latents.mean());",
    ));
    api.func(&spec, |t: &mut TensorVal| t.reduce(|x| x.mean(0)));
    let spec = api.declare(method(
        "min",
        "tensor.min() -> float",
        "The smallest value of a tensor.",
        "print(g.custom_latents.min());",
    ));
    api.func(&spec, |t: &mut TensorVal| t.reduce(|x| x.min(0)));
    let spec = api.declare(method(
        "max",
        "tensor.max() -> float",
        "The largest value of a tensor.",
        "print(g.custom_latents.max());",
    ));
    api.func(&spec, |t: &mut TensorVal| t.reduce(|x| x.max(0)));
    let spec = api.declare(method(
        "to_array",
        "tensor.to_array() -> array of float",
        "Every value of a tensor, flattened, as floats (small tensors: a concept's layer, a map's corner).",
        "let v = load_tensors(\"mycat.safetensors\")[\"mid_block.attentions.0.transformer_blocks.0.attn2\"].to_array();",
    ));
    api.func(&spec, |t: &mut TensorVal| -> RhaiResult<Array> {
        let v: Vec<f32> = rt(t
            .f32()?
            .flatten_all()
            .and_then(|x| x.to_vec1())
            .map_err(Into::into))?;
        Ok(v.into_iter().map(|x| Dynamic::from(x as FLOAT)).collect())
    });
    let spec = api.declare(
        FnSpec::new("load_tensors")
            .sig("load_tensors(path) -> map of Tensor")
            .doc("Reads every tensor of a safetensors file.")
            .example("let t = load_tensors(\"maps.safetensors\"); print(t.keys());"),
    );
    api.func(&spec, |path: &str| load_tensors(path));
    let spec = api.declare(
        FnSpec::new("save_tensors")
            .sig("save_tensors(map, path)")
            .doc("Writes a map of tensors as safetensors (e.g. latents for another tool).")
            .example("save_tensors(#{noise: g.base_latents}, \"latents.safetensors\");"),
    );
    api.func(&spec, |map: Map, path: &str| save_tensors(map, path));
}
