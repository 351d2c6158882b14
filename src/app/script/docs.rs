//! What scripts can call, declared once: each bound function's signatures, options (name, type,
//! default, one line) and example, each type's getters. The bindings declare them next to
//! their code ([`super::api`]); the same declaration checks option maps ([`super::Opts`]) and
//! renders `:help`.

use std::fmt::Write;
use std::sync::Arc;

use rhai::{Array, Dynamic, FLOAT, INT};

/// The type of an option, as scripts write it.
#[derive(Debug, Clone)]
pub enum Kind {
    /// An integer from `min` to `max`.
    Int {
        min: INT,
        max: INT,
    },
    /// A finite number (integers accepted).
    Float,
    Bool,
    Str,
    /// An array of strings.
    Strings,
    /// One of these strings.
    Choice(&'static [&'static str]),
    /// Anything else, described in words; the binding reads and checks it.
    Other(&'static str),
}

impl Kind {
    /// A count or size: 0 or more.
    pub const COUNT: Kind = Kind::Int {
        min: 0,
        max: INT::MAX,
    };
    /// At least 1.
    pub const POSITIVE: Kind = Kind::Int {
        min: 1,
        max: INT::MAX,
    };
    /// A seed: 0 or more (a negative seed is an error, not a wrapped number).
    pub const SEED: Kind = Kind::COUNT;

    /// How `:help` and errors name it.
    pub fn describe(&self) -> String {
        match self {
            Kind::Int { min, max } if *max == INT::MAX => format!("integer >= {min}"),
            Kind::Int { min, max } => format!("integer {min}..={max}"),
            Kind::Float => "number".into(),
            Kind::Bool => "true or false".into(),
            Kind::Str => "string".into(),
            Kind::Strings => "array of strings".into(),
            Kind::Choice(c) => c
                .iter()
                .map(|s| format!("{s:?}"))
                .collect::<Vec<_>>()
                .join(" | "),
            Kind::Other(d) => d.to_string(),
        }
    }
}

/// A default value (plain data, so declarations can be shared between threads).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Int(INT),
    Float(FLOAT),
    Bool(bool),
    Str(String),
    Ints(Vec<INT>),
    Strs(Vec<String>),
}

impl Value {
    pub fn to_dynamic(&self) -> Dynamic {
        match self {
            Value::Int(i) => Dynamic::from(*i),
            Value::Float(f) => Dynamic::from(*f),
            Value::Bool(b) => Dynamic::from(*b),
            Value::Str(s) => Dynamic::from(s.clone()),
            Value::Ints(v) => Dynamic::from(v.iter().map(|&i| Dynamic::from(i)).collect::<Array>()),
            Value::Strs(v) => {
                Dynamic::from(v.iter().cloned().map(Dynamic::from).collect::<Array>())
            }
        }
    }
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Int(i) => write!(f, "{i}"),
            Value::Float(x) => write!(f, "{x:?}"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Str(s) => write!(f, "{s:?}"),
            Value::Ints(v) => write!(f, "{v:?}"),
            Value::Strs(v) => write!(f, "{v:?}"),
        }
    }
}

macro_rules! value_from {
    ($($t:ty => $v:ident),*) => {
        $(impl From<$t> for Value {
            fn from(x: $t) -> Self {
                Value::$v(x.into())
            }
        })*
    };
}
value_from!(INT => Int, FLOAT => Float, bool => Bool, String => Str, &str => Str, Vec<INT> => Ints, Vec<String> => Strs);

/// One key of an options map.
#[derive(Debug, Clone)]
pub struct OptSpec {
    pub name: &'static str,
    pub kind: Kind,
    /// What a missing key means; `None`: unset (the function decides, see its text).
    pub default: Option<Value>,
    pub doc: std::borrow::Cow<'static, str>,
}

/// A bound function (all its overloads).
#[derive(Debug, Clone, Default)]
pub struct FnSpec {
    pub name: &'static str,
    /// The type it is a method of (`Model`, `Generation`, ...).
    pub receiver: Option<&'static str>,
    pub signatures: Vec<&'static str>,
    pub doc: &'static str,
    pub options: Vec<OptSpec>,
    pub example: &'static str,
}

impl FnSpec {
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            ..Self::default()
        }
    }

    /// A method of the type `receiver`.
    pub fn method(receiver: &'static str, name: &'static str) -> Self {
        Self {
            name,
            receiver: Some(receiver),
            ..Self::default()
        }
    }

    pub fn sig(mut self, signature: &'static str) -> Self {
        self.signatures.push(signature);
        self
    }

    pub fn doc(mut self, doc: &'static str) -> Self {
        self.doc = doc;
        self
    }

    /// An option with a default.
    pub fn opt(
        mut self,
        name: &'static str,
        kind: Kind,
        default: impl Into<Value>,
        doc: &'static str,
    ) -> Self {
        self.options.push(OptSpec {
            name,
            kind,
            default: Some(default.into()),
            doc: doc.into(),
        });
        self
    }

    /// An option without a default (unset unless given).
    pub fn opt_unset(mut self, name: &'static str, kind: Kind, doc: &'static str) -> Self {
        self.options.push(OptSpec {
            name,
            kind,
            default: None,
            doc: doc.into(),
        });
        self
    }

    /// [`FnSpec::opt`] with a text made at run time (from the method registry, say).
    pub fn opt_owned(
        mut self,
        name: &'static str,
        kind: Kind,
        default: impl Into<Value>,
        doc: String,
    ) -> Self {
        self.options.push(OptSpec {
            name,
            kind,
            default: Some(default.into()),
            doc: doc.into(),
        });
        self
    }

    pub fn example(mut self, example: &'static str) -> Self {
        self.example = example;
        self
    }

    /// `:help NAME`: signatures, text, options with their defaults, example, for a terminal
    /// `width` columns wide (see [`wrap_words`]).
    pub fn render(&self, width: usize) -> String {
        let mut s = String::new();
        for sig in &self.signatures {
            let _ = writeln!(s, "  {sig}");
        }
        let _ = writeln!(s, "\n{}", wrap_words(self.doc, width, 0, 0));
        if !self.options.is_empty() {
            let _ = writeln!(s, "\nOptions:");
            s.push_str(&render_options(&self.options, width));
        }
        // One statement a line: an example is copied, so it is never broken inside a string.
        let example = self.example.split("; ").collect::<Vec<_>>().join(";\n  ");
        let _ = write!(s, "\nExample:\n  {example}");
        s
    }
}

/// `text` wrapped at `width` columns, lines broken only between words (a word longer than a
/// line overflows it rather than being cut): the first line starts at column `first`, where
/// the caller has already written something, the others are indented by `indent` spaces.
pub fn wrap_words(text: &str, width: usize, first: usize, indent: usize) -> String {
    let mut out = String::new();
    let mut col = first;
    let mut line_has_word = false;
    for word in text.split(' ').filter(|w| !w.is_empty()) {
        let len = word.chars().count();
        if line_has_word && col + 1 + len > width {
            out.push('\n');
            out.push_str(&" ".repeat(indent));
            col = indent;
            line_has_word = false;
        }
        if line_has_word {
            out.push(' ');
            col += 1;
        }
        out.push_str(word);
        col += len;
        line_has_word = true;
    }
    out
}

/// The indent of continuation lines under a column that starts at `col`: that column, unless it
/// would leave fewer than 30 columns of text, then less.
fn hanging(col: usize, width: usize) -> usize {
    col.min(width.saturating_sub(30)).max(4)
}

/// One option a line: name, type, default, text; the text wraps under the type's column.
pub fn render_options(options: &[OptSpec], width: usize) -> String {
    let mut s = String::new();
    for o in options {
        let default = o
            .default
            .as_ref()
            .map(|d| format!(" = {d}"))
            .unwrap_or_default();
        let head = format!("  {:<16} ", o.name);
        let rest = format!("{}{default}: {}", o.kind.describe(), o.doc);
        let col = head.chars().count();
        let _ = writeln!(
            s,
            "{head}{}",
            wrap_words(&rest, width, col, hanging(col, width))
        );
    }
    s
}

/// A property of a type (`generation.base`).
#[derive(Debug, Clone)]
pub struct GetterSpec {
    pub name: &'static str,
    /// The type it gives.
    pub ty: &'static str,
    pub doc: &'static str,
}

/// A type scripts see.
#[derive(Debug, Clone)]
pub struct TypeSpec {
    pub name: &'static str,
    pub doc: &'static str,
    pub getters: Vec<GetterSpec>,
}

/// Everything declared: the one source of `:help`.
#[derive(Debug, Clone, Default)]
pub struct Docs {
    pub functions: Vec<Arc<FnSpec>>,
    pub types: Vec<TypeSpec>,
}

impl Docs {
    /// The functions named `name` (one per receiver), and the types or getters of that name,
    /// for a terminal `width` columns wide: text is wrapped between words.
    pub fn help(&self, topic: &str, width: usize) -> Option<String> {
        if let Some(t) = self.types.iter().find(|t| t.name == topic) {
            return Some(self.render_type(t, width));
        }
        let mut parts: Vec<String> = self
            .functions
            .iter()
            .filter(|f| f.name == topic)
            .map(|f| f.render(width))
            .collect();
        for t in &self.types {
            for g in t.getters.iter().filter(|g| g.name == topic) {
                parts.push(format!(
                    "  {}.{} -> {}\n\n{}",
                    t.name.to_lowercase(),
                    g.name,
                    g.ty,
                    wrap_words(g.doc, width, 0, 0)
                ));
            }
        }
        (!parts.is_empty()).then(|| parts.join("\n\n"))
    }

    /// `:help TYPE`: what it is, its properties and its methods.
    fn render_type(&self, t: &TypeSpec, width: usize) -> String {
        let head = format!("{}: ", t.name);
        let mut s = format!(
            "{head}{}\n",
            wrap_words(t.doc, width, head.len(), hanging(2, width))
        );
        if !t.getters.is_empty() {
            s.push_str("\nProperties:\n");
            for g in &t.getters {
                let head = format!("  .{:<16} {:<10} ", g.name, g.ty);
                let col = head.chars().count();
                let _ = writeln!(
                    s,
                    "{head}{}",
                    wrap_words(g.doc, width, col, hanging(col, width))
                );
            }
        }
        let methods: Vec<&Arc<FnSpec>> = self
            .functions
            .iter()
            .filter(|f| f.receiver == Some(t.name))
            .collect();
        if !methods.is_empty() {
            s.push_str("\nMethods (:help NAME for each):\n");
            for m in methods {
                let _ = writeln!(s, "  {}", m.signatures.first().copied().unwrap_or(m.name));
            }
        }
        s
    }

    /// `:help` alone: the functions, then each type's methods, by first signature.
    pub fn index(&self) -> String {
        let mut s = String::from("Functions (:help NAME for details, options and an example):\n");
        let mut line = |f: &FnSpec| {
            let _ = writeln!(
                s,
                "  {:<20} {}",
                f.name,
                f.signatures.first().copied().unwrap_or("")
            );
        };
        for f in self.functions.iter().filter(|f| f.receiver.is_none()) {
            line(f);
        }
        for t in &self.types {
            let methods: Vec<&Arc<FnSpec>> = self
                .functions
                .iter()
                .filter(|f| f.receiver == Some(t.name))
                .collect();
            if methods.is_empty() {
                continue;
            }
            let _ = writeln!(
                s,
                "Methods of {} (:help {} for its properties too):",
                t.name, t.name
            );
            for f in methods {
                let _ = writeln!(
                    s,
                    "  {:<20} {}",
                    f.name,
                    f.signatures.first().copied().unwrap_or("")
                );
            }
        }
        let types: Vec<&str> = self.types.iter().map(|t| t.name).collect();
        let _ = writeln!(s, "Types: {}", types.join(", "));
        s
    }

    /// Names near `topic`, for a "did you mean".
    pub fn near(&self, topic: &str) -> Vec<&'static str> {
        let mut names: Vec<&'static str> = self
            .functions
            .iter()
            .map(|f| f.name)
            .chain(self.types.iter().map(|t| t.name))
            .filter(|n| n.contains(topic) || topic.contains(n))
            .collect();
        names.sort_unstable();
        names.dedup();
        names
    }
}

#[cfg(test)]
mod tests {
    use crate::app::script::{build_engine, ScriptConfig, Session};

    /// Every function and property a script can call is declared (signature, text, example,
    /// each option's text), and every declaration is bound: the engine's own function list is
    /// walked.
    #[test]
    fn every_bound_function_is_documented() {
        let session = Session::new(ScriptConfig::default());
        let engine = build_engine(&session);
        let docs = session.docs();
        let mut bound: Vec<String> = vec![];
        for sig in engine.gen_fn_signatures(false) {
            let name = sig.split('(').next().unwrap_or("");
            let name = name.rsplit(' ').next().unwrap_or(name).to_string();
            if let Some(getter) = name.strip_prefix("get$") {
                assert!(
                    docs.types.iter().any(|t| !t.doc.is_empty()
                        && t.getters
                            .iter()
                            .any(|g| g.name == getter && !g.doc.is_empty())),
                    "property `{getter}` ({sig}) has no documentation"
                );
                continue;
            }
            if name == "to_string" || name == "to_debug" {
                continue;
            }
            assert!(
                docs.functions.iter().any(|f| f.name == name),
                "`{name}` ({sig}) has no :help entry"
            );
            bound.push(name);
        }
        for f in &docs.functions {
            assert!(
                bound.contains(&f.name.to_string()),
                "`{}` is documented but not bound",
                f.name
            );
            assert!(
                !f.signatures.is_empty() && !f.doc.is_empty() && !f.example.is_empty(),
                "`{}`: signature, text and example",
                f.name
            );
            for o in &f.options {
                assert!(
                    !o.doc.is_empty(),
                    "`{}`: option `{}` has no text",
                    f.name,
                    o.name
                );
            }
        }
    }

    /// `:help` shows a function's options with their defaults, and a type's properties and
    /// methods.
    #[test]
    fn help_shows_options_with_defaults_and_types_with_their_members() {
        let session = Session::new(ScriptConfig::default());
        build_engine(&session);
        let docs = session.docs();
        let generate = docs.help("generate", 200).unwrap();
        assert!(
            generate.contains("steps            integer >= 1 = 50: denoising steps"),
            "{generate}"
        );
        assert!(
            generate.contains("seed             integer >= 0 = 0"),
            "{generate}"
        );
        let train = docs.help("train_concept", 200).unwrap();
        assert!(
            train.contains("train_steps      integer >= 1: training steps (default: the method's)"),
            "{train}"
        );
        // Every registered method is offered, in the registry's order.
        let offered = crate::methods::names()
            .iter()
            .map(|n| format!("\"{n}\""))
            .collect::<Vec<_>>()
            .join(" | ");
        assert!(
            train.contains(&format!("method           {offered} = \"infusion\"")),
            "{train}"
        );
        assert!(offered.contains("\"custom_diffusion\""), "{offered}");
        let g = docs.help("Generation", 200).unwrap();
        assert!(g.contains(".base ") && g.contains(".custom_latents"), "{g}");
        assert!(g.contains("generation.attention(word)"), "{g}");
        let c = docs.help("Concept", 200).unwrap();
        assert!(
            c.contains(".train_steps") && c.contains("concept.save(path)"),
            "{c}"
        );
        assert!(docs
            .help("base", 200)
            .unwrap()
            .contains("generation.base -> Image"));
        assert!(docs.help("nothing_like_this", 200).is_none());
    }

    /// Issue 21, item 11: `:help` fits the terminal: lines are broken between words, never
    /// inside one, and options' text continues under their type's column.
    #[test]
    fn help_wraps_between_words_to_the_terminal_width() {
        let session = Session::new(ScriptConfig::default());
        build_engine(&session);
        let docs = session.docs();
        for topic in [
            "train_concept",
            "generate",
            "Generation",
            "overtraining_curves",
        ] {
            let wide = docs.help(topic, 10_000).unwrap();
            let text = docs.help(topic, 72).unwrap();
            let words = |t: &str| t.split_whitespace().map(String::from).collect::<Vec<_>>();
            assert_eq!(words(&text), words(&wide), "{topic}: the same words, whole");
            // Past the signatures (code, kept whole) ...
            for line in text.lines().skip_while(|l| !l.is_empty()) {
                // ... only a single word longer than the line, or an example's statement, may
                // overflow.
                let long_word = line.trim().split(' ').count() == 1;
                let example = line.starts_with("  let ") || line.starts_with("  show(");
                assert!(
                    line.chars().count() <= 72 || long_word || example,
                    "{topic}: {line:?}"
                );
            }
        }
        let train = docs.help("train_concept", 72).unwrap();
        let method = train
            .lines()
            .position(|l| l.starts_with("  method "))
            .unwrap();
        let next = train.lines().nth(method + 1).unwrap();
        assert!(
            next.starts_with(&" ".repeat(19)) && !next[19..].starts_with(' '),
            "the text goes on under the type's column: {next:?}\n{train}"
        );
    }
}
