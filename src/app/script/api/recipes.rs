//! What recipes need beyond the model: their arguments, parsed one way for all of them.
//!
//! A recipe declares its command line as a usage line and gets a map back:
//!
//! ```text
//! let a = parse_args(ARGS, "single_concept.rhai FOLDER NAME WORD [--train-steps 500] [--out .]");
//! a.folder, a.name, a.word, a.train_steps (an integer: its default is one), a.out
//! ```
//!
//! - `NAME`: a required positional argument; `[NAME]`: an optional one (unit when absent);
//!   `NAME...` / `[NAME...]`: the rest (an array, at least one / maybe none);
//! - `[--flag VALUE]`: an option with that default, typed by it (an integer default takes
//!   integers, a number numbers, anything else text); `[--flag PLACEHOLDER]` in capitals: an
//!   option without default (unit when absent); `[--flag]`: a switch (false unless given);
//! - keys are the names in lower case, dashes as underscores.
//!
//! A wrong command line, and `--help`, end the recipe with a [`Usage`] the runner prints alone
//! (exit status 2, or 0 for `--help`) instead of as a script error.

use rhai::{Array, Dynamic, EvalAltResult, Map, Position, FLOAT, INT};

use super::Api;
use crate::app::script::docs::FnSpec;
use crate::app::script::RhaiResult;

/// A recipe's usage: shown alone, with what was wrong (`None`: `--help` was asked for).
#[derive(Debug, Clone)]
pub struct Usage {
    pub usage: String,
    pub problem: Option<String>,
}

impl Usage {
    fn error(usage: &str, problem: Option<String>) -> Box<EvalAltResult> {
        Box::new(EvalAltResult::ErrorRuntime(
            Dynamic::from(Usage {
                usage: usage.to_string(),
                problem,
            }),
            Position::NONE,
        ))
    }
}

/// The usage a script error carries, if it is one (see [`Usage`]).
pub fn usage_of(err: &EvalAltResult) -> Option<Usage> {
    match err {
        EvalAltResult::ErrorRuntime(d, _) => d.clone().try_cast::<Usage>(),
        EvalAltResult::ErrorInFunctionCall(_, _, inner, _) => usage_of(inner),
        _ => None,
    }
}

#[derive(Debug, Clone)]
enum Item {
    Positional {
        name: String,
        required: bool,
        rest: bool,
    },
    Flag {
        name: String,
        default: Option<Dynamic>,
    },
    Switch {
        name: String,
    },
}

fn is_placeholder(s: &str) -> bool {
    s.chars().any(|c| c.is_ascii_uppercase())
        && s.chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_' || c == '.')
}

/// A default as typed by its text: an integer, a number, or text.
fn typed(text: &str) -> Dynamic {
    if let Ok(i) = text.parse::<INT>() {
        Dynamic::from(i)
    } else if let Ok(f) = text.parse::<FLOAT>() {
        Dynamic::from(f)
    } else {
        Dynamic::from(text.to_string())
    }
}

/// The items of a usage line (its first word, the recipe's name, left out).
fn items(usage: &str) -> Result<Vec<Item>, String> {
    let mut out = vec![];
    let mut words = usage.split_whitespace().skip(1).peekable();
    while let Some(w) = words.next() {
        let (optional, w) = match w.strip_prefix('[') {
            Some(inner) => (true, inner),
            None => (false, w),
        };
        let closed = |w: &str| w.strip_suffix(']').map(str::to_string);
        if let Some(flag) = w.strip_prefix("--") {
            if !optional {
                return Err(format!("`--{flag}` must be in brackets: [--{flag} ...]"));
            }
            if let Some(name) = closed(flag) {
                out.push(Item::Switch { name });
                continue;
            }
            let value = words
                .next()
                .and_then(closed)
                .ok_or_else(|| format!("`[--{flag}` has no closing `VALUE]`"))?;
            let default = (!is_placeholder(&value)).then(|| typed(&value));
            out.push(Item::Flag {
                name: flag.to_string(),
                default,
            });
            continue;
        }
        let name = if optional {
            closed(w).ok_or_else(|| format!("`[{w}` has no closing `]`"))?
        } else {
            w.to_string()
        };
        let (name, rest) = match name.strip_suffix("...") {
            Some(n) => (n.to_string(), true),
            None => (name, false),
        };
        out.push(Item::Positional {
            name,
            required: !optional,
            rest,
        });
    }
    Ok(out)
}

fn key(name: &str) -> String {
    name.to_lowercase().replace('-', "_")
}

/// The flag value `text` as its default's type.
fn value_as(default: &Option<Dynamic>, flag: &str, text: &str) -> Result<Dynamic, String> {
    match default {
        Some(d) if d.is_int() => text
            .parse::<INT>()
            .map(Dynamic::from)
            .map_err(|_| format!("--{flag} takes a whole number, not `{text}`")),
        Some(d) if d.is_float() => text
            .parse::<FLOAT>()
            .ok()
            .filter(|f| f.is_finite())
            .map(Dynamic::from)
            .ok_or_else(|| format!("--{flag} takes a number, not `{text}`")),
        _ => Ok(Dynamic::from(text.to_string())),
    }
}

/// The flags' values (defaults where not given) and the positional arguments, in order.
/// `Err(None)`: help was asked for.
fn parse_flags(items: &[Item], args: &[String]) -> Result<(Map, Vec<String>), Option<String>> {
    let mut map = Map::new();
    for item in items {
        match item {
            Item::Flag { name, default } => {
                map.insert(key(name).into(), default.clone().unwrap_or(Dynamic::UNIT));
            }
            Item::Switch { name } => {
                map.insert(key(name).into(), Dynamic::from(false));
            }
            Item::Positional { .. } => {}
        }
    }
    let mut positional = vec![];
    let mut it = args.iter();
    let mut flags_done = false;
    while let Some(a) = it.next() {
        if a == "-h" && !flags_done {
            return Err(None);
        }
        if flags_done || !a.starts_with("--") || a == "--" {
            if a == "--" && !flags_done {
                flags_done = true;
            } else {
                positional.push(a.clone());
            }
            continue;
        }
        let (flag, inline) = match a[2..].split_once('=') {
            Some((f, v)) => (f, Some(v.to_string())),
            None => (&a[2..], None),
        };
        if flag == "help" {
            return Err(None);
        }
        let item = items
            .iter()
            .find(|i| matches!(i, Item::Flag { name, .. } | Item::Switch { name } if name == flag));
        match item {
            Some(Item::Switch { name }) => {
                map.insert(key(name).into(), Dynamic::from(true));
            }
            Some(Item::Flag { name, default }) => {
                let text = match inline {
                    Some(v) => v,
                    None => it
                        .next()
                        .cloned()
                        .ok_or_else(|| Some(format!("--{flag} needs a value")))?,
                };
                map.insert(
                    key(name).into(),
                    value_as(default, name, &text).map_err(Some)?,
                );
            }
            _ => return Err(Some(format!("unknown option `--{flag}`"))),
        }
    }
    Ok((map, positional))
}

/// Parses `args` against the usage line's items. `Err(None)`: help was asked for.
fn parse(items: &[Item], args: &[String]) -> Result<Map, Option<String>> {
    let (mut map, positional) = parse_flags(items, args)?;
    let mut rest = positional.into_iter();
    for item in items {
        let Item::Positional {
            name,
            required,
            rest: is_rest,
        } = item
        else {
            continue;
        };
        let value = if *is_rest {
            let all: Array = rest.by_ref().map(Dynamic::from).collect();
            if *required && all.is_empty() {
                return Err(Some(format!("missing {name}")));
            }
            Dynamic::from(all)
        } else {
            match rest.next() {
                Some(v) => Dynamic::from(v),
                None if *required => return Err(Some(format!("missing {name}"))),
                None => Dynamic::UNIT,
            }
        };
        map.insert(key(name).into(), value);
    }
    if let Some(extra) = rest.next() {
        return Err(Some(format!("unexpected argument `{extra}`")));
    }
    Ok(map)
}

fn parse_args(args: Array, usage: &str) -> RhaiResult<Map> {
    let items =
        items(usage).map_err(|e| Usage::error(usage, Some(format!("bad usage line: {e}"))))?;
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    parse(&items, &args).map_err(|problem| Usage::error(usage, problem))
}

pub fn register(api: &mut Api) {
    let spec = api.declare(
        FnSpec::new("parse_args")
            .sig("parse_args(ARGS, usage) -> map")
            .doc("Parses a recipe's arguments against its usage line: NAME is a required argument, [NAME] an optional one, NAME... the rest; [--flag DEFAULT] an option typed by its default ([--flag VALUE] in capitals: no default), [--flag] a switch. Keys are the names in lower case with _ for -. A wrong command line or --help ends the recipe with the usage alone (exit 2, or 0 for --help).")
            .example("let a = parse_args(ARGS, \"my.rhai FOLDER [--steps 50] [--out out.png]\"); print(a.folder + \" \" + a.steps);"),
    );
    api.func(&spec, parse_args);
    api.ty::<Usage>("Usage", "a recipe's usage, raised by parse_args");
    let spec = api.declare(
        FnSpec::new("write_text")
            .sig("write_text(path, text) -> string")
            .doc("Writes a text file (a table, a CSV) atomically; returns the path.")
            .example("write_text(\"out/table.md\", \"| a | b |\\n\");"),
    );
    api.func(&spec, |path: &str, text: &str| -> RhaiResult<String> {
        let p = std::path::Path::new(path);
        crate::app::script::rt(crate::util::fs::write_atomic(p, |w| {
            w.write_all(text.as_bytes())
                .map_err(|e| crate::error::Error::io(p, e))
        }))?;
        Ok(path.to_string())
    });
    let spec = api.declare(
        FnSpec::new("memory")
            .sig("memory() -> map")
            .doc("This process's resident memory in bytes: #{rss: now, peak: the most so far} (Linux; an error elsewhere). What decides whether a model fits the machine.")
            .example("let m = memory(); print(`peak ${m.peak / 1048576} MiB`);"),
    );
    api.func(&spec, || -> RhaiResult<Map> {
        let m = crate::util::memory::process_memory().ok_or_else(|| {
            crate::app::script::Thrown::new(
                crate::ErrorKind::Unsupported,
                "memory(): this system does not report the process's memory",
            )
        })?;
        let mut map = Map::new();
        map.insert("rss".into(), Dynamic::from(m.rss as INT));
        map.insert("peak".into(), Dynamic::from(m.peak as INT));
        Ok(map)
    });
}

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(p) = &self.problem {
            writeln!(f, "error: {p}")?;
        }
        write!(f, "usage: {}", self.usage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const USAGE: &str =
        "r.rhai FOLDER NAME [WORD] [CONCEPT...] [--train-steps 500] [--lr 0.01] [--out .] [--clip DIR] [--fast]";

    fn run(args: &[&str]) -> Result<Map, Option<String>> {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        parse(&items(USAGE).unwrap(), &args)
    }

    #[test]
    fn positionals_flags_and_switches_with_their_types() {
        let m = run(&[
            "photos",
            "pot",
            "--train-steps",
            "30",
            "teapot",
            "a",
            "b",
            "--out=x",
            "--fast",
        ])
        .unwrap();
        let s = |k: &str| m[k].to_string();
        assert_eq!(
            (s("folder"), s("name"), s("word")),
            ("photos".into(), "pot".into(), "teapot".into())
        );
        assert_eq!(m["concept"].clone().into_array().unwrap().len(), 2);
        assert_eq!(m["train_steps"].as_int(), Ok(30));
        assert_eq!(m["lr"].as_float(), Ok(0.01));
        assert_eq!((s("out"), m["fast"].as_bool()), ("x".into(), Ok(true)));
        assert!(m["clip"].is_unit());
        let m = run(&["photos", "pot"]).unwrap();
        assert!(m["word"].is_unit() && m["concept"].clone().into_array().unwrap().is_empty());
        assert_eq!(
            (m["train_steps"].as_int(), m["fast"].as_bool()),
            (Ok(500), Ok(false))
        );
    }

    #[test]
    fn wrong_command_lines_say_what_is_wrong() {
        let problem = |args: &[&str]| run(args).unwrap_err().unwrap_or_default();
        assert_eq!(problem(&["photos"]), "missing NAME");
        assert_eq!(
            problem(&["a", "b", "--steps", "3"]),
            "unknown option `--steps`"
        );
        assert_eq!(
            problem(&["a", "b", "--train-steps", "x"]),
            "--train-steps takes a whole number, not `x`"
        );
        assert_eq!(
            problem(&["a", "b", "--lr", "nan"]),
            "--lr takes a number, not `nan`"
        );
        assert_eq!(problem(&["a", "b", "--out"]), "--out needs a value");
        assert_eq!(run(&["--help"]).unwrap_err(), None);
        let strict = items("s.rhai A").unwrap();
        let args = vec!["x".to_string(), "y".to_string()];
        assert_eq!(
            parse(&strict, &args).unwrap_err(),
            Some("unexpected argument `y`".into())
        );
    }
}
