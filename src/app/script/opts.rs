//! Options maps (`#{seed: 1, steps: 30}`) read with their types checked and unknown keys
//! refused, so a typo such as `#{step: 30}` is an error that lists the keys that exist.

use rhai::{Dynamic, Map, FLOAT, INT};

use super::{err, RhaiResult};

pub struct Opts<'a> {
    map: &'a Map,
    func: &'a str,
}

impl<'a> Opts<'a> {
    /// Checks that every key of `map` is one of `allowed`.
    pub fn new(map: &'a Map, func: &'a str, allowed: &[&str]) -> RhaiResult<Self> {
        if let Some(k) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(err(format!(
                "{func}: unknown option `{k}` (options: {})",
                allowed.join(", ")
            )));
        }
        Ok(Self { map, func })
    }

    fn get(&self, key: &str) -> Option<&Dynamic> {
        self.map.get(key).filter(|v| !v.is_unit())
    }

    fn wrong(&self, key: &str, want: &str, v: &Dynamic) -> Box<rhai::EvalAltResult> {
        err(format!(
            "{}: option `{key}` must be {want}, not {} ({v})",
            self.func,
            v.type_name()
        ))
    }

    pub fn int(&self, key: &str) -> RhaiResult<Option<INT>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_int()
                .map(Some)
                .map_err(|_| self.wrong(key, "an integer", v)),
        }
    }

    /// A non-negative integer.
    pub fn usize(&self, key: &str) -> RhaiResult<Option<usize>> {
        match self.int(key)? {
            None => Ok(None),
            Some(i) if i >= 0 => Ok(Some(i as usize)),
            Some(i) => Err(err(format!(
                "{}: option `{key}` must not be negative ({i})",
                self.func
            ))),
        }
    }

    /// A number (integers accepted).
    pub fn float(&self, key: &str) -> RhaiResult<Option<FLOAT>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_float()
                .or_else(|_| v.as_int().map(|i| i as FLOAT))
                .map(Some)
                .map_err(|_| self.wrong(key, "a number", v)),
        }
    }

    pub fn string(&self, key: &str) -> RhaiResult<Option<String>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) if v.is_string() => Ok(Some(v.to_string())),
            Some(v) => Err(self.wrong(key, "a string", v)),
        }
    }

    pub fn bool(&self, key: &str) -> RhaiResult<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .map_err(|_| self.wrong(key, "true or false", v)),
        }
    }

    pub fn strings(&self, key: &str) -> RhaiResult<Option<Vec<String>>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) if v.is_array() => v
                .clone()
                .into_array()
                .map_err(|_| self.wrong(key, "an array of strings", v))?
                .into_iter()
                .map(|s| {
                    if s.is_string() {
                        Ok(s.to_string())
                    } else {
                        Err(self.wrong(key, "an array of strings", &s))
                    }
                })
                .collect::<RhaiResult<Vec<_>>>()
                .map(Some),
            Some(v) => Err(self.wrong(key, "an array of strings", v)),
        }
    }
}
