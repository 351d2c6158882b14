//! The Rhai scripting layer: one engine factory for the REPL, the recipe runner and the tests.
//!
//! Bound functions are registered by concern (`api/model.rs`, `api/generation.rs`,
//! `api/concepts.rs`, `api/metrics.rs`, `api/images.rs`, `api/tensors.rs`, `api/recipes.rs`),
//! each with its declaration ([`docs`]: signatures, options, example), which `:help` renders and
//! option maps are checked against. They share a [`Session`] (the default model settings, the
//! concepts loaded so far, the job that Ctrl-C cancels). Every bound function is volatile, so Rhai
//! never runs one at compile time. Their errors reach a script's `catch` as a map that keeps
//! the error's kind ([`Thrown`]); a stop (Ctrl-C) is never caught ([`cancelled`]).

pub mod api;
pub mod docs;
mod imports;
mod opts;

use crate::actions::ModelRequest;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use rhai::{Dynamic, Engine, EvalAltResult, OptimizationLevel, Position, Scope};

use crate::customize::set::ConceptSet;
use crate::error::ErrorKind;
use crate::job::Job;

pub use docs::Docs;
pub use opts::Opts;

/// What a session runs with: the global flags.
#[derive(Debug, Clone)]
pub struct ScriptConfig {
    /// `--model`, `--device`, `--dtype`, `--config`, `--vae`, `--kernels`: what `load_model()`
    /// loads, and how, where its options do not say.
    pub model: ModelRequest,
    /// Never draw images in the terminal; print their file path.
    pub no_images: bool,
    /// Where `import "name"` finds the stdlib modules (after the importing file's folder, or
    /// the current folder at the REPL's prompt).
    pub stdlib: PathBuf,
    /// Where `show` writes images it cannot draw.
    pub out_dir: PathBuf,
    /// Draw progress bars.
    pub progress: bool,
    /// How much data a script may hold (see [`ScriptLimits`]).
    pub limits: ScriptLimits,
    /// A person at the prompt (the REPL): Ctrl-C during training returns the concept reached
    /// and the session goes on. Otherwise (a recipe) a signal stops the script once what was
    /// learned is kept.
    pub interactive: bool,
}

impl Default for ScriptConfig {
    fn default() -> Self {
        Self {
            model: ModelRequest {
                device: "cpu".into(),
                dtype: "f32".into(),
                ..ModelRequest::default()
            },
            no_images: false,
            stdlib: crate::assets::stdlib(),
            out_dir: PathBuf::from("infusion-out"),
            progress: true,
            limits: ScriptLimits::default(),
            interactive: false,
        }
    }
}

/// The engine's limits, which keep a runaway script (a string doubled in a loop, `blob(1e11)`,
/// arrays nested without end) an error instead of the end of the process: at most
/// [`ScriptLimits::ARRAY`] array or BLOB elements in one value (nested ones counted),
/// [`ScriptLimits::MAP`] map entries, [`ScriptLimits::STRING`] bytes of text, each times
/// `scale` (`--script-limits N`; 0 lifts them), and 256 levels of calls and of expression
/// nesting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScriptLimits {
    pub scale: usize,
}

impl ScriptLimits {
    pub const ARRAY: usize = 4 << 20;
    pub const MAP: usize = 1 << 20;
    pub const STRING: usize = 128 << 20;
    pub const CALL_LEVELS: usize = 256;
    pub const EXPR_DEPTH: usize = 256;

    fn apply(self, engine: &mut Engine) {
        let scaled = |n: usize| n.saturating_mul(self.scale);
        engine.set_max_array_size(scaled(Self::ARRAY));
        engine.set_max_map_size(scaled(Self::MAP));
        engine.set_max_string_size(scaled(Self::STRING));
        engine.set_max_call_levels(Self::CALL_LEVELS);
        engine.set_max_expr_depths(Self::EXPR_DEPTH, Self::EXPR_DEPTH);
    }
}

impl Default for ScriptLimits {
    fn default() -> Self {
        Self { scale: 1 }
    }
}

/// State shared by the bound functions of one engine.
#[derive(Debug)]
pub struct Session {
    pub config: ScriptConfig,
    /// The running job: Ctrl-C cancels it.
    pub job: Job,
    /// Concepts loaded or trained in this session, found by `<name>` in prompts.
    pub concepts: RwLock<ConceptSet>,
    /// The last model loaded (concepts are checked against it).
    pub model: Mutex<Option<api::model::Model>>,
    /// Images `show` wrote to files.
    pub shown: AtomicUsize,
    /// What the engine's functions and types are (set by [`build_engine`]).
    docs: OnceLock<Arc<Docs>>,
}

impl Session {
    pub fn new(config: ScriptConfig) -> Arc<Self> {
        let job = if config.progress {
            Job::with_progress()
        } else {
            Job::quiet()
        };
        Arc::new(Self {
            config,
            job,
            concepts: RwLock::new(ConceptSet::new()),
            model: Mutex::new(None),
            shown: AtomicUsize::new(0),
            docs: OnceLock::new(),
        })
    }

    /// The declarations of every bound function and type (`:help`).
    pub fn docs(&self) -> Arc<Docs> {
        self.docs.get().cloned().unwrap_or_default()
    }
}

/// The error type of bound functions.
pub type RhaiResult<T> = Result<T, Box<EvalAltResult>>;

/// Turns a library result into a Rhai one: the error is [`Thrown::of`] it (its kind, its
/// message as it is), a cancellation a stop ([`cancelled`]).
pub fn rt<T>(r: crate::Result<T>) -> RhaiResult<T> {
    r.map_err(|e| Thrown::of(&e).into())
}

/// A bound function's refusal of its arguments, with a message (Rhai attaches the call's
/// position): an `invalid_argument` error naming no argument.
pub fn err(msg: impl Into<String>) -> Box<EvalAltResult> {
    Thrown::new(ErrorKind::InvalidArgument, msg).into()
}

/// The error of a stop (Ctrl-C, a signal): Rhai's termination, as the engine's progress
/// check raises it. No `try` catches it: the input (REPL) or the recipe ends, whatever the
/// script does.
pub fn cancelled() -> Box<EvalAltResult> {
    Box::new(EvalAltResult::ErrorTerminated(
        Dynamic::from("cancelled"),
        Position::NONE,
    ))
}

/// A bound function's error as a script sees it. What `catch (e)` gets is an object map:
/// `e.kind` ([`ErrorKind::name`]: `"invalid_argument"`, `"io"`, ...), `e.message` (the text
/// printed when nothing catches it), and where the error has them `e.arg` (the argument or
/// option that is wrong) and `e.path` (the file it is about).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Thrown {
    pub kind: ErrorKind,
    pub message: String,
    pub arg: Option<String>,
    pub path: Option<PathBuf>,
}

impl Thrown {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            arg: None,
            path: None,
        }
    }

    /// A library error: its kind, message, argument and file.
    pub fn of(e: &crate::Error) -> Self {
        Self {
            kind: e.kind(),
            message: e.to_string(),
            arg: e.argument().map(str::to_string),
            path: e.path().map(Path::to_path_buf),
        }
    }

    /// Names the argument that is wrong.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.arg = Some(arg.into());
        self
    }

    /// Names the file the error is about.
    pub fn path(mut self, path: impl Into<PathBuf>) -> Self {
        self.path = Some(path.into());
        self
    }

    /// Says something else than the error it was made from.
    pub fn message(mut self, message: impl Into<String>) -> Self {
        self.message = message.into();
        self
    }

    /// The map's `:help Error`.
    fn declare(api: &mut api::Api) {
        api.shape(
            "Error",
            "what `catch (e)` gets when a function of this tool fails: a map \
             #{kind, message}, with `arg` and `path` where the error has them, as in \
             `try { m.generate(\"a cat\", #{steps: 0}) } catch (e) { if e.kind == \
             \"invalid_argument\" { print(`${e.arg}: ${e.message}`) } else { throw e } }`. \
             An error nothing catches prints its message, with the line and a caret. Errors of \
             Rhai itself (a function that does not exist, a value of the wrong type) are maps \
             with `message` but no `kind`; `throw x` is caught as x. A stop (Ctrl-C, a signal) \
             is never caught: it ends the input at the prompt, or the recipe.",
            &[
                (
                    "kind",
                    "string",
                    "what went wrong: invalid_argument (a value given is wrong), io (a file \
                     could not be read or written), config (a model's configuration), \
                     safetensors (not a safetensors file), format (a file's content is not \
                     what it should be), weights (weights that do not fit the model), \
                     model_not_found, unsupported (what this build or version does not do), \
                     tokenizer, image (an image file), diverged (training), not_finite (NaN or \
                     infinite values), tensor (a tensor operation), internal (a bug)",
                ),
                (
                    "message",
                    "string",
                    "what the error says: the text printed when nothing catches it",
                ),
                (
                    "arg",
                    "string",
                    "invalid_argument: the argument, option or setting that is wrong, as \
                     scripts name it (absent where the function cannot name one)",
                ),
                (
                    "path",
                    "string",
                    "io, config, safetensors, format, tokenizer, image: the file the error is \
                     about",
                ),
            ],
        );
    }

    /// The map a script catches.
    pub fn to_value(&self) -> Dynamic {
        let mut m = rhai::Map::new();
        m.insert("kind".into(), self.kind.name().into());
        m.insert("message".into(), self.message.clone().into());
        if let Some(a) = &self.arg {
            m.insert("arg".into(), a.clone().into());
        }
        if let Some(p) = &self.path {
            m.insert("path".into(), p.display().to_string().into());
        }
        m.into()
    }

    /// The error a value a script threw or caught stands for, if it is such a map (one made
    /// by [`Thrown::to_value`], or a script's own with a known `kind` and a `message`).
    pub fn from_value(value: &Dynamic) -> Option<Self> {
        let m = value.read_lock::<rhai::Map>()?;
        let text = |k: &str| m.get(k).and_then(|v| v.clone().into_string().ok());
        let kind = text("kind")?;
        let kind = ErrorKind::ALL.into_iter().find(|k| k.name() == kind)?;
        Some(Self {
            kind,
            message: text("message")?,
            arg: text("arg"),
            path: text("path").map(PathBuf::from),
        })
    }
}

impl From<Thrown> for Box<EvalAltResult> {
    /// A runtime error carrying the map, except a cancellation: a stop ([`cancelled`]).
    fn from(t: Thrown) -> Self {
        if t.kind == ErrorKind::Cancelled {
            return cancelled();
        }
        Box::new(EvalAltResult::ErrorRuntime(t.to_value(), Position::NONE))
    }
}

/// The kind of a script's error as its host sees it: [`ErrorKind::Cancelled`] for a stop
/// (Ctrl-C, a signal, a cancelled job), a bound function's error's own kind, `None` for Rhai's
/// own errors (a syntax error, a function that does not exist) and values a script threw.
pub fn error_kind(err: &EvalAltResult) -> Option<ErrorKind> {
    match err.unwrap_inner() {
        EvalAltResult::ErrorTerminated(..) => Some(ErrorKind::Cancelled),
        EvalAltResult::ErrorRuntime(d, _) => Thrown::from_value(d).map(|t| t.kind),
        _ => None,
    }
}

/// Builds the engine every entry point uses.
pub fn build_engine(session: &Arc<Session>) -> Engine {
    let mut engine = Engine::new();
    // Native functions are volatile anyway; Simple never calls functions at compile time.
    engine.set_optimization_level(OptimizationLevel::Simple);
    session.config.limits.apply(&mut engine);
    engine.set_module_resolver(imports::Imports::new(&session.config.stdlib));
    // `print` as every output of the tool: a closed pipe is quiet, a full device one error.
    engine.on_print(|text| crate::app::stdout::line_or_say(text));
    // Long scripts stop at the next operation once the job is cancelled (Ctrl-C).
    let job = session.job.clone();
    engine.on_progress(move |_| {
        if job.is_cancelled() {
            Some(Dynamic::from("cancelled"))
        } else {
            None
        }
    });
    let docs = api::register(&mut engine, session);
    let _ = session.docs.set(Arc::new(docs));
    engine
}

/// The innermost message of an error and the position to show for it: for a failing native
/// call, where the script called it.
pub fn describe(err: &EvalAltResult) -> (String, Position) {
    let mut pos = err.position();
    let mut e = err;
    while let EvalAltResult::ErrorInFunctionCall(_, _, inner, p) = e {
        if !p.is_none() {
            pos = *p;
        }
        e = inner;
    }
    if pos.is_none() {
        pos = e.position();
    }
    let msg = match e {
        EvalAltResult::ErrorRuntime(d, _) => match Thrown::from_value(d) {
            Some(t) => t.message,
            None => d.to_string(),
        },
        EvalAltResult::ErrorTerminated(_, _) => "cancelled".to_string(),
        other => {
            let text = other.to_string();
            match text.rfind(" (line ") {
                Some(i) if text.ends_with(')') => text[..i].to_string(),
                _ => text,
            }
        }
    };
    (msg, pos)
}

/// The source line of `pos` and, under it, a caret at its column (`"  TEXT\n  ^"`), with
/// the line and column; `None` when the position is unknown.
pub fn caret(source: &str, pos: Position) -> Option<(usize, usize, String)> {
    let line = pos.line()?;
    let col = pos.position().unwrap_or(1);
    let text = source.lines().nth(line - 1).unwrap_or("");
    let lines = format!("  {text}\n  {}^", " ".repeat(col.saturating_sub(1)));
    Some((line, col, lines))
}

/// `NAME:LINE:COL: message`, then the source line and a caret under the column.
pub fn format_error(name: &str, source: &str, err: &EvalAltResult) -> String {
    let (msg, pos) = describe(err);
    match caret(source, pos) {
        Some((line, col, lines)) => format!("{name}:{line}:{col}: {msg}\n{lines}"),
        None => format!("{name}: {msg}"),
    }
}

/// How a recipe run failed.
#[derive(Debug)]
pub enum RunError {
    /// A script error, formatted as `FILE:LINE:COL: message` with the line and a caret.
    Failed(String),
    /// The recipe's usage, shown alone: a wrong command line, or `--help` (with the recipe's
    /// header comment).
    Usage { text: String, help: bool },
}

/// The comment block a recipe starts with, without the `//`: what `--help` shows under the
/// usage (the recipe runner's and the REPL's `:load FILE --help`).
pub fn header(source: &str) -> String {
    source
        .lines()
        .take_while(|l| l.starts_with("//"))
        .map(|l| {
            l.trim_start_matches("//")
                .strip_prefix(' ')
                .unwrap_or(l.trim_start_matches("//"))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs a recipe file with `args` bound to `ARGS`.
pub fn run_file(session: &Arc<Session>, path: &Path, args: &[String]) -> Result<(), RunError> {
    let name = path.display().to_string();
    // A FIFO or device would block: only regular files are read.
    let bytes = crate::util::fs::read_regular(path).map_err(|e| RunError::Failed(e.to_string()))?;
    let source = String::from_utf8(bytes).map_err(|_| {
        RunError::Failed(format!("{name}: not UTF-8 text (a recipe is a text file)"))
    })?;
    let engine = build_engine(session);
    let mut scope = Scope::new();
    let argv: rhai::Array = args.iter().map(|a| Dynamic::from(a.clone())).collect();
    scope.push("ARGS", argv);
    let mut ast = engine.compile(&source).map_err(|e| {
        let e: EvalAltResult = e.into();
        RunError::Failed(format_error(&name, &source, &e))
    })?;
    // Its imports come from its own folder first.
    ast.set_source(name.as_str());
    engine
        .run_ast_with_scope(&mut scope, &ast)
        .map_err(|e| match api::recipes::usage_of(&e) {
            Some(u) if u.problem.is_none() => RunError::Usage {
                text: format!("{u}\n\n{}", header(&source)),
                help: true,
            },
            Some(u) => RunError::Usage {
                text: u.to_string(),
                help: false,
            },
            None => RunError::Failed(format_error(&name, &source, &e)),
        })
}
