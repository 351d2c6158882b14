//! The functions and types scripts see, registered by concern.

pub mod concepts;
pub mod images;
pub mod metrics;
pub mod model;
pub mod tensors;

use std::sync::Arc;

use rhai::Engine;

use super::Session;

/// Registers a native function as volatile (never run at compile time).
macro_rules! volatile {
    ($engine:expr, $name:expr, $f:expr) => {
        rhai::FuncRegistration::new($name)
            .with_volatility(true)
            .register_into_engine($engine, $f)
    };
}
pub(crate) use volatile;

/// Registers every type and function.
pub fn register(engine: &mut Engine, session: &Arc<Session>) {
    model::register(engine, session);
    concepts::register(engine, session);
    images::register(engine, session);
    metrics::register(engine, session);
    tensors::register(engine, session);
}

/// A JSON value as a Rhai value.
pub fn json_to_dynamic(v: &serde_json::Value) -> rhai::Dynamic {
    use rhai::Dynamic;
    match v {
        serde_json::Value::Null => Dynamic::UNIT,
        serde_json::Value::Bool(b) => Dynamic::from(*b),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Dynamic::from(i),
            None => Dynamic::from(n.as_f64().unwrap_or(f64::NAN)),
        },
        serde_json::Value::String(s) => Dynamic::from(s.clone()),
        serde_json::Value::Array(a) => {
            Dynamic::from(a.iter().map(json_to_dynamic).collect::<rhai::Array>())
        }
        serde_json::Value::Object(o) => Dynamic::from(
            o.iter()
                .map(|(k, v)| (k.as_str().into(), json_to_dynamic(v)))
                .collect::<rhai::Map>(),
        ),
    }
}
