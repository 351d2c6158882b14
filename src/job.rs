//! Progress, cancellation and messages for long jobs (generation, training).
//!
//! A [`Job`] is cheap to clone and shared between the code that runs a job and the code that may
//! cancel it (a Ctrl-C handler): long loops call [`Job::check`] between steps, and stop with
//! [`Error::Cancelled`](crate::Error::Cancelled), keeping what they reached where that makes sense.
//! Library code reports warnings and notes through it ([`Job::warn`], [`Job::note`]), so every
//! front end shows them the same way; a warning is shown once per job (until [`Job::reset`]).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Default)]
pub struct Job {
    cancelled: Arc<AtomicBool>,
    show_progress: bool,
    messages: Arc<Messages>,
}

/// The messages of a job: shown on stderr, or kept (for tests and callers that show them
/// elsewhere).
#[derive(Debug, Default)]
struct Messages {
    keep: bool,
    kept: Mutex<Vec<String>>,
    warned: Mutex<HashSet<String>>,
}

impl Job {
    /// A job without a visible progress bar.
    pub fn quiet() -> Self {
        Self::default()
    }

    /// A job that draws progress bars on stderr (indicatif hides them when stderr is not a
    /// terminal).
    pub fn with_progress() -> Self {
        Self {
            show_progress: true,
            ..Self::default()
        }
    }

    /// A job without progress bars that keeps its messages instead of printing them (see
    /// [`Job::messages`]).
    pub fn collecting() -> Self {
        Self {
            messages: Arc::new(Messages {
                keep: true,
                ..Messages::default()
            }),
            ..Self::default()
        }
    }

    /// A warning for the user (`warning: ...`); the same text is shown once.
    pub fn warn(&self, msg: impl std::fmt::Display) {
        let msg = format!("warning: {msg}");
        let new = self
            .messages
            .warned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(msg.clone());
        if new {
            self.say(msg);
        }
    }

    /// A note for the user (`note: ...`): what the tool chose on their behalf.
    pub fn note(&self, msg: impl std::fmt::Display) {
        self.say(format!("note: {msg}"));
    }

    fn say(&self, line: String) {
        if self.messages.keep {
            self.messages
                .kept
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(line);
        } else {
            eprintln!("{line}");
        }
    }

    /// The messages kept by a [`Job::collecting`] job, in order.
    pub fn messages(&self) -> Vec<String> {
        self.messages
            .kept
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Asks the running job to stop at its next check.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
    }

    /// Clears a cancellation and the warnings shown, so the job object can run the next job.
    pub fn reset(&self) {
        self.cancelled.store(false, Ordering::SeqCst);
        self.messages
            .warned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }

    /// The flag a signal handler sets.
    pub fn cancel_flag(&self) -> Arc<AtomicBool> {
        self.cancelled.clone()
    }

    /// `Err(Cancelled)` once the job was cancelled.
    pub fn check(&self) -> Result<()> {
        if self.is_cancelled() {
            Err(Error::Cancelled)
        } else {
            Ok(())
        }
    }

    /// Progress of `len` steps starting at `start`: a bar on a terminal, and where stderr is
    /// not one (a log, a pipe) a line every tenth of the way, so a long run is not silent.
    pub fn progress(&self, len: usize, start: usize, name: &str) -> Progress {
        let bar = self.bar(len, name);
        bar.set_position(start as u64);
        Progress {
            bar,
            lines: self.show_progress && !std::io::stderr().is_terminal(),
            name: name.to_string(),
            len,
            every: len.div_ceil(10).max(1),
        }
    }

    /// A progress bar of `len` steps, hidden for quiet jobs.
    pub fn bar(&self, len: usize, message: &str) -> ProgressBar {
        if !self.show_progress {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new(len as u64);
        let style = ProgressStyle::with_template(
            "{msg:>10} [{elapsed_precise}] {wide_bar} {pos}/{len} ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        bar.set_message(message.to_string());
        bar
    }
}

/// The progress of a job's steps (see [`Job::progress`]).
pub struct Progress {
    bar: ProgressBar,
    lines: bool,
    name: String,
    len: usize,
    every: usize,
}

impl Progress {
    /// `step` steps are done; `status` says how it goes (`loss 0.1234`).
    pub fn set(&self, step: usize, status: &str) {
        self.bar.set_position(step as u64);
        self.bar.set_message(status.to_string());
        if self.lines && (step.is_multiple_of(self.every) || step == self.len) {
            eprintln!("{}: step {step}/{}, {status}", self.name, self.len);
        }
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
