//! Ctrl-C (SIGINT), SIGTERM and SIGHUP (the terminal closed, treated as SIGTERM). Each stops
//! the running job at its next step: a generation is dropped, a training run saves what it
//! reached. The process then exits 130 (SIGINT), 143 (SIGTERM) or 129 (SIGHUP), as a shell
//! reports them. While the REPL waits at its prompt there is no job to stop: SIGTERM and SIGHUP
//! end the session at once (Ctrl-C is a key there, clearing the line).

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

use crate::job::Job;

pub struct Signals {
    term: Arc<AtomicBool>,
    hup: Arc<AtomicBool>,
    idle: Arc<AtomicBool>,
}

impl Signals {
    /// Routes both signals to `job`'s cancel flag. Failing to install them (no signals on this
    /// platform) leaves the defaults.
    pub fn install(job: &Job) -> Self {
        let s = Self {
            term: Arc::new(AtomicBool::new(false)),
            hup: Arc::new(AtomicBool::new(false)),
            idle: Arc::new(AtomicBool::new(false)),
        };
        let cancel = job.cancel_flag();
        let _ = signal_hook::flag::register(SIGINT, cancel.clone());
        for (signal, status) in [(SIGTERM, 143), (SIGHUP, 129)] {
            let _ = signal_hook::flag::register(signal, cancel.clone());
            let _ = signal_hook::flag::register(signal, s.term.clone());
            let _ =
                signal_hook::flag::register_conditional_shutdown(signal, status, s.idle.clone());
        }
        let _ = signal_hook::flag::register(SIGHUP, s.hup.clone());
        s
    }

    /// While idle (the REPL at its prompt) SIGTERM exits at once.
    pub fn set_idle(&self, idle: bool) {
        self.idle.store(idle, Ordering::SeqCst);
    }

    /// True once SIGTERM or SIGHUP arrived.
    pub fn terminated(&self) -> bool {
        self.term.load(Ordering::SeqCst)
    }

    /// The exit status of a run the user stopped: 129 after SIGHUP, 143 after SIGTERM, else
    /// 130.
    pub fn stop_status(&self) -> ExitCode {
        ExitCode::from(if self.hup.load(Ordering::SeqCst) {
            129
        } else if self.terminated() {
            143
        } else {
            130
        })
    }
}
