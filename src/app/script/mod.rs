//! The Rhai scripting layer: one engine factory for the REPL, the recipe runner and the tests.
//!
//! Bound functions are registered by concern (`api/model.rs`, `api/generation.rs`,
//! `api/concepts.rs`, `api/metrics.rs`, `api/images.rs`, `api/tensors.rs`, `api/recipes.rs`),
//! each with its declaration ([`docs`]: signatures, options, example), which `:help` renders and
//! option maps are checked against. They share a [`Session`] (the default model settings, the
//! concepts loaded so far, the job that Ctrl-C cancels). Every bound function is volatile, so Rhai
//! never runs one at compile time.

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
use crate::job::Job;

pub use api::recipes::Usage;
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

/// Turns a library result into a Rhai one; the message carries the library error as it is.
pub fn rt<T>(r: crate::Result<T>) -> RhaiResult<T> {
    r.map_err(|e| err(e.to_string()))
}

/// A runtime error with a message (Rhai attaches the call's position).
pub fn err(msg: impl Into<String>) -> Box<EvalAltResult> {
    Box::new(EvalAltResult::ErrorRuntime(
        Dynamic::from(msg.into()),
        Position::NONE,
    ))
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
        EvalAltResult::ErrorRuntime(d, _) => d.to_string(),
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
