//! The process's memory as the kernel counts it: resident now and at its peak.

/// Resident memory of this process, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessMemory {
    /// Resident now (`VmRSS`).
    pub rss: u64,
    /// The most resident at any time so far (`VmHWM`, the high-water mark).
    pub peak: u64,
}

/// This process's resident memory, where the system reports it (`/proc/self/status` on Linux;
/// `None` elsewhere).
pub fn process_memory() -> Option<ProcessMemory> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_status(&status)
}

/// Starts this process's peak (`VmHWM`) over from its resident memory now, as Linux allows
/// (writing 5 to `/proc/self/clear_refs`); false where it cannot, so a later peak is the
/// process's whole life. Freed memory the process keeps counts as resident: call
/// [`release_freed`] first to leave it out.
pub fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Hands the pages of freed heap memory back to the system (glibc's `malloc_trim`). The binary
/// keeps freed blocks for the next denoising step's tensors (`keep_freed_memory` in main.rs),
/// and blocks in the middle of the heap stay resident until this: after a training run, the
/// gigabytes of its activations.
pub fn release_freed() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of glibc's heaps to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// `VmRSS` and `VmHWM` of a `/proc/PID/status` text (in kB there).
fn parse_status(status: &str) -> Option<ProcessMemory> {
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kb: u64 = line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kb * 1024)
    };
    Some(ProcessMemory {
        rss: field("VmRSS:")?,
        peak: field("VmHWM:")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_resident_and_peak_lines() {
        let text = "Name:\tx\nVmPeak:\t  999 kB\nVmHWM:\t    2048 kB\nVmRSS:\t    1024 kB\n";
        assert_eq!(
            parse_status(text),
            Some(ProcessMemory {
                rss: 1024 * 1024,
                peak: 2048 * 1024
            })
        );
        assert_eq!(parse_status("Name:\tx\n"), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_peak_starts_over_and_sees_what_is_touched_after() {
        const BYTES: usize = 256 << 20;
        let big = vec![1u8; BYTES];
        std::hint::black_box(&big);
        let with = process_memory().unwrap();
        drop(big);
        if !reset_peak() {
            return; // a kernel without clear_refs: nothing to hold
        }
        let after = process_memory().unwrap();
        // Other tests run beside this one: the peak is back near what is resident now, well
        // under the 256 MiB released, then rises with what is touched again.
        assert!(
            after.peak + (BYTES as u64) / 2 <= with.peak,
            "{with:?} then {after:?}"
        );
        let again = vec![1u8; BYTES];
        std::hint::black_box(&again);
        assert!(process_memory().unwrap().peak >= after.peak + (BYTES as u64) * 9 / 10);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_has_a_peak_at_least_its_resident_memory() {
        let m = process_memory().expect("Linux reports /proc/self/status");
        assert!(m.rss > 0 && m.peak >= m.rss, "{m:?}");
    }
}
