//! Options maps (`#{seed: 1, steps: 30}`) read against their declaration ([`OptSpec`]): an
//! unknown key is an error that lists the declared ones, a value of the wrong type or out of
//! range is an error that names the key, and a missing key gives the declared default.

use rhai::{Dynamic, Map, FLOAT, INT};

use super::docs::{FnSpec, Kind, OptSpec};
use super::{RhaiResult, Thrown};
use crate::ErrorKind;

pub struct Opts<'a> {
    map: &'a Map,
    func: &'a str,
    options: &'a [OptSpec],
}

impl<'a> Opts<'a> {
    /// The options of `spec`'s function.
    pub fn of(map: &'a Map, spec: &'a FnSpec) -> RhaiResult<Self> {
        Self::new(map, spec.name, &spec.options)
    }

    /// Checks every key of `map` against `options` (of the function `func`).
    pub fn new(map: &'a Map, func: &'a str, options: &'a [OptSpec]) -> RhaiResult<Self> {
        let o = Self { map, func, options };
        for (k, v) in map {
            let spec = options
                .iter()
                .find(|s| s.name == k.as_str())
                .ok_or_else(|| {
                    let names: Vec<&str> = options.iter().map(|s| s.name).collect();
                    Thrown::new(
                        ErrorKind::InvalidArgument,
                        format!(
                            "{func}: unknown option `{k}` (options: {})",
                            names.join(", ")
                        ),
                    )
                    .arg(k.as_str())
                })?;
            if !v.is_unit() {
                o.check(spec, v)?;
            }
        }
        Ok(o)
    }

    fn wrong(&self, spec: &OptSpec, v: &Dynamic) -> Box<rhai::EvalAltResult> {
        let shown = if v.is_string() {
            format!("{:?}", v.to_string())
        } else {
            v.to_string()
        };
        Thrown::new(
            ErrorKind::InvalidArgument,
            format!(
                "{}: option `{}` must be {}, not {shown}",
                self.func,
                spec.name,
                spec.kind.describe()
            ),
        )
        .arg(spec.name)
        .into()
    }

    fn check(&self, spec: &OptSpec, v: &Dynamic) -> RhaiResult<()> {
        let ok = match &spec.kind {
            Kind::Int { min, max } => v.as_int().is_ok_and(|i| (*min..=*max).contains(&i)),
            Kind::Float => as_number(v).is_some_and(f64::is_finite),
            Kind::Bool => v.is_bool(),
            Kind::Str => v.is_string(),
            Kind::Strings => {
                v.is_array()
                    && v.clone()
                        .cast::<rhai::Array>()
                        .iter()
                        .all(Dynamic::is_string)
            }
            Kind::Choice(choices) => v.is_string() && choices.contains(&v.to_string().as_str()),
            Kind::Other(_) => true,
        };
        if ok {
            Ok(())
        } else {
            Err(self.wrong(spec, v))
        }
    }

    /// The value given for `key`, else its declared default.
    /// Whether the call gave `key` (not only its default).
    pub fn given(&self, key: &str) -> bool {
        self.map.get(key).is_some_and(|v| !v.is_unit())
    }

    pub fn get(&self, key: &str) -> Option<Dynamic> {
        let given = self.map.get(key).filter(|v| !v.is_unit());
        match given {
            Some(v) => Some(v.clone()),
            None => self
                .options
                .iter()
                .find(|s| s.name == key)
                .and_then(|s| s.default.as_ref().map(|d| d.to_dynamic())),
        }
    }

    pub fn int(&self, key: &str) -> Option<INT> {
        self.get(key).and_then(|v| v.as_int().ok())
    }

    /// A declared `Int` option with a minimum of 0 or more, as `usize`.
    pub fn usize(&self, key: &str) -> Option<usize> {
        self.int(key).map(|i| i as usize)
    }

    /// A declared `Int` option with a minimum of 0 or more, as `u64`.
    pub fn u64(&self, key: &str) -> Option<u64> {
        self.int(key).map(|i| i as u64)
    }

    pub fn float(&self, key: &str) -> Option<FLOAT> {
        self.get(key).as_ref().and_then(as_number)
    }

    pub fn string(&self, key: &str) -> Option<String> {
        self.get(key)
            .filter(Dynamic::is_string)
            .map(|v| v.to_string())
    }

    pub fn bool(&self, key: &str) -> Option<bool> {
        self.get(key).and_then(|v| v.as_bool().ok())
    }

    pub fn strings(&self, key: &str) -> Option<Vec<String>> {
        self.get(key).and_then(|v| {
            v.into_array()
                .ok()
                .map(|a| a.iter().map(|s| s.to_string()).collect())
        })
    }
}

fn as_number(v: &Dynamic) -> Option<FLOAT> {
    v.as_float()
        .ok()
        .or_else(|| v.as_int().ok().map(|i| i as FLOAT))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> FnSpec {
        FnSpec::new("f")
            .opt("seed", Kind::SEED, 0 as INT, "the seed")
            .opt("guidance", Kind::Float, 8.0 as FLOAT, "guidance")
            .opt_unset("width", Kind::POSITIVE, "width")
            .opt("maps", Kind::Choice(&["light", "all"]), "light", "maps")
    }

    fn map(pairs: &[(&str, Dynamic)]) -> Map {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), v.clone()))
            .collect()
    }

    #[test]
    fn defaults_come_from_the_declaration() {
        let s = spec();
        let m = map(&[("guidance", Dynamic::from(3 as INT))]);
        let o = Opts::of(&m, &s).unwrap();
        assert_eq!((o.u64("seed"), o.float("guidance")), (Some(0), Some(3.0)));
        assert_eq!(
            (o.usize("width"), o.string("maps")),
            (None, Some("light".into()))
        );
    }

    #[test]
    fn wrong_keys_types_and_ranges_are_named() {
        let s = spec();
        let e = |pairs: &[(&str, Dynamic)]| {
            Opts::of(&map(pairs), &s)
                .err()
                .map(|e| crate::app::script::describe(&e).0)
                .unwrap_or_default()
        };
        let unknown = e(&[("sede", Dynamic::from(1 as INT))]);
        assert!(
            unknown.contains("unknown option `sede` (options: seed, guidance, width, maps)"),
            "{unknown}"
        );
        let negative = e(&[("seed", Dynamic::from(-1 as INT))]);
        assert!(
            negative.contains("`seed` must be integer >= 0, not -1"),
            "{negative}"
        );
        let zero = e(&[("width", Dynamic::from(0 as INT))]);
        assert!(zero.contains("`width` must be integer >= 1"), "{zero}");
        let nan = e(&[("guidance", Dynamic::from(FLOAT::NAN))]);
        assert!(nan.contains("`guidance` must be number"), "{nan}");
        let choice = e(&[("maps", Dynamic::from("some"))]);
        assert!(
            choice.contains(r#"must be "light" | "all", not "some""#),
            "{choice}"
        );
        // A script's `catch` gets the option's name.
        for k in ["sede", "maps"] {
            let Err(err) = Opts::of(&map(&[(k, Dynamic::from(2 as INT))]), &s) else {
                panic!("{k}: accepted");
            };
            let rhai::EvalAltResult::ErrorRuntime(value, _) = *err else {
                panic!("{k}: {err}");
            };
            let thrown = crate::app::script::Thrown::from_value(&value).unwrap();
            assert_eq!(thrown.arg.as_deref(), Some(k));
        }
    }
}
