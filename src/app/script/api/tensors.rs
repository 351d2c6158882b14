//! Tensors in scripts: latents, attention maps, anything read from or written to safetensors.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use rhai::{Array, Dynamic, Engine, Map, FLOAT, INT};

use super::volatile;
use crate::app::script::{err, rt, RhaiResult, Session};

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
    let bytes =
        safetensors::serialize(sorted, None).map_err(|e| err(format!("save_tensors: {e}")))?;
    let p = Path::new(path);
    rt(crate::util::fs::write_atomic(p, |w| {
        w.write_all(&bytes).map_err(|e| crate::Error::io(p, e))
    }))
}

pub fn register(engine: &mut Engine, _session: &Arc<Session>) {
    engine.register_type_with_name::<TensorVal>("Tensor");
    engine.register_fn("to_string", |t: &mut TensorVal| t.to_string());
    engine.register_fn("to_debug", |t: &mut TensorVal| t.to_string());
    engine.register_get("shape", |t: &mut TensorVal| -> Array {
        t.0.dims()
            .iter()
            .map(|&d| Dynamic::from(d as INT))
            .collect()
    });
    engine.register_get("dtype", |t: &mut TensorVal| {
        format!("{:?}", t.0.dtype()).to_lowercase()
    });
    engine.register_fn("mean", |t: &mut TensorVal| t.reduce(|x| x.mean(0)));
    engine.register_fn("min", |t: &mut TensorVal| t.reduce(|x| x.min(0)));
    engine.register_fn("max", |t: &mut TensorVal| t.reduce(|x| x.max(0)));
    engine.register_fn("to_array", |t: &mut TensorVal| -> RhaiResult<Array> {
        let v: Vec<f32> = rt(t
            .f32()?
            .flatten_all()
            .and_then(|x| x.to_vec1())
            .map_err(Into::into))?;
        Ok(v.into_iter().map(|x| Dynamic::from(x as FLOAT)).collect())
    });
    volatile!(engine, "load_tensors", |path: &str| load_tensors(path));
    volatile!(engine, "save_tensors", |map: Map, path: &str| save_tensors(
        map, path
    ));
}
