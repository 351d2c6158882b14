//! Standard output as command-line tools treat it: a reader that went away (`| head`) ends the
//! output quietly, a device that cannot take it (`> /dev/full`) is one error, never a panic.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Error, Result};

/// Set once a write to standard output failed for another reason than a closed pipe.
static FAILED: AtomicBool = AtomicBool::new(false);

/// Writes `text` to standard output and flushes it. A closed pipe discards it quietly (the
/// work goes on and its files are written); any other failure is an error naming the output.
pub fn print(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => {
            FAILED.store(true, Ordering::Relaxed);
            Err(Error::io(Path::new("standard output"), e))
        }
    }
}

/// [`print`] of a line.
pub fn line(text: impl std::fmt::Display) -> Result<()> {
    print(&format!("{text}\n"))
}

/// [`line`] where no error can be returned (a script's `print`, the REPL): a failure is said on
/// standard error, once, and [`failed`] remembers it for the exit status.
pub fn line_or_say(text: impl std::fmt::Display) {
    let first = !FAILED.load(Ordering::Relaxed);
    if let Err(e) = line(text) {
        if first {
            eprintln!("error: {e}");
        }
    }
}

/// Whether a write to standard output failed (other than a closed pipe).
pub fn failed() -> bool {
    FAILED.load(Ordering::Relaxed)
}
