//! The library's one error type.
//!
//! Every variant that comes from a file names the file; weight problems name the tensor, the
//! expected and the found shape. Library code returns these; it never panics on user input.

use std::fmt;
use std::path::PathBuf;

/// What went wrong with one tensor of a weight file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightProblem {
    /// The model needs this tensor and no file holds it.
    Missing {
        tensor: String,
        expected: Vec<usize>,
    },
    /// The tensor is there with another shape.
    WrongShape {
        tensor: String,
        file: PathBuf,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
}

impl fmt::Display for WeightProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WeightProblem::Missing { tensor, expected } => {
                write!(
                    f,
                    "tensor `{tensor}` is missing (expected shape {expected:?})"
                )
            }
            WeightProblem::WrongShape {
                tensor,
                file,
                expected,
                found,
            } => write!(
                f,
                "tensor `{tensor}` in {} has shape {found:?}, expected {expected:?}",
                file.display()
            ),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("{}: {msg}", path.display())]
    Config { path: PathBuf, msg: String },

    #[error("{}: not a valid safetensors file: {msg}", path.display())]
    Safetensors { path: PathBuf, msg: String },

    /// A valid safetensors file whose content is not what it should be (a concept's metadata,
    /// a tensor's type).
    #[error("{}: {msg}", path.display())]
    Format { path: PathBuf, msg: String },

    #[error(
        "{component} weights ({}) do not fit the model:\n  {}",
        files_list(files),
        problems_list(problems, hint)
    )]
    Weights {
        component: String,
        files: Vec<PathBuf>,
        problems: Vec<WeightProblem>,
        /// What most likely went wrong, when the problems show a pattern.
        hint: Option<String>,
    },

    #[error("model not found: {0}")]
    ModelNotFound(String),

    #[error("unsupported: {0}")]
    Unsupported(String),

    #[error("invalid argument `{arg}`: {msg}")]
    InvalidArgument { arg: String, msg: String },

    #[error("tokenizer ({}): {msg}", path.display())]
    Tokenizer { path: PathBuf, msg: String },

    #[error("image {}: {msg}", path.display())]
    Image { path: PathBuf, msg: String },

    #[error("cancelled")]
    Cancelled,

    /// Training diverged (a loss or an update that is not finite); the message says at which
    /// step and what was kept.
    #[error("training diverged: {0}")]
    Diverged(String),

    /// A stage of the model produced NaN or infinite values; the message names the stage.
    #[error("{0}")]
    NotFinite(String),

    /// Something that cannot happen on any input did (a bug: the message says what).
    #[error("internal error (a bug, please report it): {0}")]
    Internal(String),

    /// A tensor operation failed; shown without candle's backtrace.
    #[error("{}", root_cause(.0))]
    Candle(#[from] candle_core::Error),
}

fn files_list(files: &[PathBuf]) -> String {
    files
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Every problem, one a line; when there are many, the first few, the count and the hint.
fn problems_list(problems: &[WeightProblem], hint: &Option<String>) -> String {
    const SHOWN: usize = 8;
    let mut lines: Vec<String> = problems
        .iter()
        .take(SHOWN)
        .map(ToString::to_string)
        .collect();
    if problems.len() > SHOWN {
        let missing = problems
            .iter()
            .filter(|p| matches!(p, WeightProblem::Missing { .. }))
            .count();
        lines.push(format!(
            "... {} problems in all ({missing} tensors missing)",
            problems.len()
        ));
    }
    if let Some(h) = hint {
        lines.push(h.clone());
    }
    lines.join("\n  ")
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn config(path: impl Into<PathBuf>, msg: impl fmt::Display) -> Self {
        Error::Config {
            path: path.into(),
            msg: msg.to_string(),
        }
    }

    pub(crate) fn arg(arg: &str, msg: impl fmt::Display) -> Self {
        Error::InvalidArgument {
            arg: arg.to_string(),
            msg: msg.to_string(),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// The innermost message of a candle error, without the backtrace wrapping.
pub(crate) fn root_cause(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => root_cause(inner),
        candle_core::Error::Context { inner, context } => {
            format!("{context}: {}", root_cause(inner))
        }
        other => other.to_string(),
    }
}
