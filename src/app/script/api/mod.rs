//! The functions and types scripts see, registered by concern. Every registration goes through
//! [`Api`], which keeps its declaration ([`FnSpec`], [`TypeSpec`]) for `:help` and for checking
//! option maps.

pub mod charts;
pub mod compare;
pub mod concepts;
pub mod generation;
pub mod images;
pub mod metrics;
pub mod model;
pub mod recipes;
pub mod tensors;
pub mod toy;

use std::fmt::Display;
use std::sync::Arc;

use rhai::{Engine, FuncRegistration, RhaiNativeFunc, Variant};

use super::docs::{Docs, FnSpec, GetterSpec, TypeSpec};
use super::{RhaiResult, Session};

/// Registers functions, types and properties into an engine together with their declarations.
pub struct Api<'e> {
    engine: &'e mut Engine,
    docs: Docs,
}

impl<'e> Api<'e> {
    pub fn new(engine: &'e mut Engine) -> Self {
        Self {
            engine,
            docs: Docs::default(),
        }
    }

    /// Declares a function; its overloads are registered with [`Api::func`].
    pub fn declare(&mut self, spec: FnSpec) -> Arc<FnSpec> {
        let spec = Arc::new(spec);
        self.docs.functions.push(spec.clone());
        spec
    }

    /// Registers one overload of a declared function, volatile (never run at compile time: it
    /// may touch the GPU, the disk or randomness).
    pub fn func<A: 'static, const N: usize, const X: bool, R, const F: bool, FUNC>(
        &mut self,
        spec: &FnSpec,
        f: FUNC,
    ) where
        R: Variant + Clone,
        FUNC: RhaiNativeFunc<A, N, X, R, F> + 'static,
    {
        FuncRegistration::new(spec.name)
            .with_volatility(true)
            .with_comments([format!("/// {}", spec.doc)])
            .register_into_engine(self.engine, f);
    }

    /// Declares a type; it prints through its `Display`.
    pub fn ty<T: Variant + Clone + Display>(&mut self, name: &'static str, doc: &'static str) {
        self.engine.register_type_with_name::<T>(name);
        self.engine
            .register_fn("to_string", |x: &mut T| x.to_string());
        self.engine
            .register_fn("to_debug", |x: &mut T| x.to_string());
        self.docs.types.push(TypeSpec {
            name,
            doc,
            getters: vec![],
        });
    }

    /// Declares a shape of map scripts get (no Rust type: its properties are the map's keys),
    /// for `:help`; `properties` are (name, type, text).
    pub fn shape(
        &mut self,
        name: &'static str,
        doc: &'static str,
        properties: &[(&'static str, &'static str, &'static str)],
    ) {
        self.docs.types.push(TypeSpec {
            name,
            doc,
            getters: properties
                .iter()
                .map(|&(name, ty, doc)| GetterSpec { name, ty, doc })
                .collect(),
        });
    }

    fn add_getter(&mut self, ty: &'static str, getter: GetterSpec) {
        match self.docs.types.iter_mut().find(|t| t.name == ty) {
            Some(t) => t.getters.push(getter),
            // An undeclared type: listed without text (the documentation test names it).
            None => self.docs.types.push(TypeSpec {
                name: ty,
                doc: "",
                getters: vec![getter],
            }),
        }
    }

    /// A property of the declared type `ty` (a `T`), giving a `gives`.
    pub fn get<T: Variant + Clone, R: Variant + Clone>(
        &mut self,
        key: (&'static str, &'static str, &'static str),
        doc: &'static str,
        f: impl Fn(&mut T) -> R + 'static,
    ) {
        self.get_or_fail(key, doc, move |x: &mut T| Ok(f(x)));
    }

    /// A property that can fail.
    pub fn get_or_fail<T: Variant + Clone, R: Variant + Clone>(
        &mut self,
        (ty, name, gives): (&'static str, &'static str, &'static str),
        doc: &'static str,
        f: impl Fn(&mut T) -> RhaiResult<R> + 'static,
    ) {
        self.engine.register_get(name, move |x: &mut T| f(x));
        self.add_getter(
            ty,
            GetterSpec {
                name,
                ty: gives,
                doc,
            },
        );
    }

    pub fn finish(self) -> Docs {
        self.docs
    }
}

/// Registers every type and function; returns their declarations.
pub fn register(engine: &mut Engine, session: &Arc<Session>) -> Docs {
    let mut api = Api::new(engine);
    images::register(&mut api, session);
    tensors::register(&mut api);
    model::register(&mut api, session);
    generation::register(&mut api);
    concepts::register(&mut api, session);
    metrics::register(&mut api, session);
    compare::register(&mut api, session);
    recipes::register(&mut api);
    toy::register(&mut api, session);
    charts::register(&mut api);
    super::Thrown::declare(&mut api);
    api.finish()
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
