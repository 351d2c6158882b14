//! Progress, cancellation and messages for long jobs (generation, training).
//!
//! A [`Job`] is cheap to clone and shared between the code that runs a job and the code that may
//! cancel it (a Ctrl-C handler): long loops call [`Job::check`] between steps, and stop with
//! [`Error::Cancelled`](crate::Error::Cancelled), keeping what they reached where that makes sense.
//! Library code reports warnings and notes through it ([`Job::warn`], [`Job::note`]), so every
//! front end shows them the same way; a warning is shown once per job (until [`Job::reset`]).

use std::collections::HashSet;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle, TermLike, WeakProgressBar};

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
    /// The bar drawn last: a message printed while it shows is printed above it, not into it.
    bar: Mutex<LastBar>,
}

/// The last bar a job made (a weak handle: the bar ends with its owner).
#[derive(Default)]
struct LastBar(Option<WeakProgressBar>);

impl std::fmt::Debug for LastBar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LastBar")
    }
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
            return;
        }
        let bar = self
            .messages
            .bar
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .as_ref()
            .and_then(WeakProgressBar::upgrade)
            .filter(|b| !b.is_finished() && !b.is_hidden());
        match bar {
            Some(b) => b.suspend(|| eprintln!("{line}")),
            None => eprintln!("{line}"),
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

    /// A progress bar of `len` steps, hidden for quiet jobs and where stderr is not a
    /// terminal (see [`Stderr`] for how it is drawn).
    pub fn bar(&self, len: usize, message: &str) -> ProgressBar {
        if !self.show_progress {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::with_draw_target(Some(len as u64), Stderr::target());
        let style = ProgressStyle::with_template(
            "{msg:>10} [{elapsed_precise}] {wide_bar} {pos}/{len} ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        bar.set_message(message.to_string());
        *self.messages.bar.lock().unwrap_or_else(|e| e.into_inner()) =
            LastBar(Some(bar.downgrade()));
        bar
    }
}

/// Columns a bar leaves free at the right of the terminal: room for the `^C` a terminal echoes
/// when Ctrl-C is pressed.
const ECHO_ROOM: u16 = 2;

/// Standard error as indicatif's terminal, [`ECHO_ROOM`] columns narrower than it is.
/// indicatif pads each bar line to the terminal's full width, so the `^C` the terminal echoes
/// for Ctrl-C used to wrap onto a line of its own; the bar's next redraw and its clearing then
/// worked on that line, and the bar as last drawn before Ctrl-C (28/200) stayed on screen
/// above the message saying where the run stopped (step 29, the step under way when Ctrl-C
/// came). With the room kept, the echo stays on the bar's line and goes with it.
#[derive(Debug, Default)]
struct Stderr {
    pending: Mutex<Vec<u8>>,
}

impl Stderr {
    /// The draw target of a visible bar: this terminal at 20 redraws a second, or hidden when
    /// stderr is not a terminal (a log, a pipe) or `TERM` is `dumb`, as indicatif's own.
    fn target() -> ProgressDrawTarget {
        let dumb = std::env::var("TERM").is_ok_and(|t| t == "dumb");
        if !std::io::stderr().is_terminal() || dumb {
            return ProgressDrawTarget::hidden();
        }
        ProgressDrawTarget::term_like_with_hz(Box::new(Stderr::default()), 20)
    }

    fn put(&self, s: &str) -> std::io::Result<()> {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// The size of the terminal on stderr, `(columns, rows)`; 80 x 24 when it cannot be read.
fn terminal_size() -> (u16, u16) {
    #[cfg(unix)]
    {
        let mut ws = libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCGWINSZ writes one `winsize` through the pointer, which points at one.
        let ok = unsafe { libc::ioctl(libc::STDERR_FILENO, libc::TIOCGWINSZ, &mut ws) } == 0;
        if ok && ws.ws_col > 0 && ws.ws_row > 0 {
            return (ws.ws_col, ws.ws_row);
        }
    }
    (80, 24)
}

impl TermLike for Stderr {
    fn width(&self) -> u16 {
        terminal_size().0.saturating_sub(ECHO_ROOM).max(20)
    }
    fn height(&self) -> u16 {
        terminal_size().1
    }
    fn move_cursor_up(&self, n: usize) -> std::io::Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.put(&format!("\x1b[{n}A"))
    }
    fn move_cursor_down(&self, n: usize) -> std::io::Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.put(&format!("\x1b[{n}B"))
    }
    fn move_cursor_right(&self, n: usize) -> std::io::Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.put(&format!("\x1b[{n}C"))
    }
    fn move_cursor_left(&self, n: usize) -> std::io::Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.put(&format!("\x1b[{n}D"))
    }
    fn write_line(&self, s: &str) -> std::io::Result<()> {
        self.put(s)?;
        self.put("\n")
    }
    fn write_str(&self, s: &str) -> std::io::Result<()> {
        self.put(s)
    }
    fn clear_line(&self) -> std::io::Result<()> {
        self.put("\r\x1b[2K")
    }
    fn flush(&self) -> std::io::Result<()> {
        let bytes = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        let mut err = std::io::stderr().lock();
        err.write_all(&bytes)?;
        err.flush()
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
