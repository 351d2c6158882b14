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

/// What kind of error an [`Error`] is, for callers that act on it rather than print it (a
/// script's `catch`, see `app::script`). Each kind has one stable name ([`ErrorKind::name`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// A value the caller gave (an argument, an option, a setting) is wrong.
    InvalidArgument,
    /// Reading or writing a file failed.
    Io,
    /// A model's configuration file (or a file read as one) is wrong.
    Config,
    /// A file is not a valid safetensors file.
    Safetensors,
    /// A file's content is not what it should be (a concept's metadata, a checkpoint's).
    Format,
    /// Weights do not fit the model.
    Weights,
    /// No model where one was asked for.
    ModelNotFound,
    /// Something this build or this version does not do.
    Unsupported,
    /// A tokenizer file is wrong.
    Tokenizer,
    /// An image file cannot be read or written.
    Image,
    /// The job was cancelled (Ctrl-C, a signal).
    Cancelled,
    /// Training diverged.
    Diverged,
    /// A stage of the model produced NaN or infinite values.
    NotFinite,
    /// A bug.
    Internal,
    /// A tensor operation failed.
    Tensor,
}

impl ErrorKind {
    /// Every kind, in declaration order.
    pub const ALL: [ErrorKind; 15] = [
        ErrorKind::InvalidArgument,
        ErrorKind::Io,
        ErrorKind::Config,
        ErrorKind::Safetensors,
        ErrorKind::Format,
        ErrorKind::Weights,
        ErrorKind::ModelNotFound,
        ErrorKind::Unsupported,
        ErrorKind::Tokenizer,
        ErrorKind::Image,
        ErrorKind::Cancelled,
        ErrorKind::Diverged,
        ErrorKind::NotFinite,
        ErrorKind::Internal,
        ErrorKind::Tensor,
    ];

    /// The kind's name as scripts see it (`invalid_argument`, `io`, ...).
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::InvalidArgument => "invalid_argument",
            ErrorKind::Io => "io",
            ErrorKind::Config => "config",
            ErrorKind::Safetensors => "safetensors",
            ErrorKind::Format => "format",
            ErrorKind::Weights => "weights",
            ErrorKind::ModelNotFound => "model_not_found",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Tokenizer => "tokenizer",
            ErrorKind::Image => "image",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::Diverged => "diverged",
            ErrorKind::NotFinite => "not_finite",
            ErrorKind::Internal => "internal",
            ErrorKind::Tensor => "tensor",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Error {
    /// What kind of error this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io { .. } => ErrorKind::Io,
            Error::Config { .. } => ErrorKind::Config,
            Error::Safetensors { .. } => ErrorKind::Safetensors,
            Error::Format { .. } => ErrorKind::Format,
            Error::Weights { .. } => ErrorKind::Weights,
            Error::ModelNotFound(_) => ErrorKind::ModelNotFound,
            Error::Unsupported(_) => ErrorKind::Unsupported,
            Error::InvalidArgument { .. } => ErrorKind::InvalidArgument,
            Error::Tokenizer { .. } => ErrorKind::Tokenizer,
            Error::Image { .. } => ErrorKind::Image,
            Error::Cancelled => ErrorKind::Cancelled,
            Error::Diverged(_) => ErrorKind::Diverged,
            Error::NotFinite(_) => ErrorKind::NotFinite,
            Error::Internal(_) => ErrorKind::Internal,
            Error::Candle(_) => ErrorKind::Tensor,
        }
    }

    /// The argument an [`Error::InvalidArgument`] names.
    pub fn argument(&self) -> Option<&str> {
        match self {
            Error::InvalidArgument { arg, .. } => Some(arg),
            _ => None,
        }
    }

    /// The file an error is about, for the kinds that name one.
    pub fn path(&self) -> Option<&std::path::Path> {
        match self {
            Error::Io { path, .. }
            | Error::Config { path, .. }
            | Error::Safetensors { path, .. }
            | Error::Format { path, .. }
            | Error::Tokenizer { path, .. }
            | Error::Image { path, .. } => Some(path),
            _ => None,
        }
    }

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
