/// Weights are used in place in their memory-mapped files (see `util::mapped`): this allocator
/// releases them when the model is dropped.
#[global_allocator]
static ALLOC: infusion_repl::util::MappedAlloc = infusion_repl::util::MappedAlloc;

/// The stack of the thread everything runs on: scripts may nest data up to the engine's limits
/// (`app::script::ScriptLimits`), and printing, comparing or dropping such data recurses as
/// deep. Only the pages used are committed.
const STACK_BYTES: usize = 1 << 30;

fn main() -> std::process::ExitCode {
    keep_freed_memory();
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let run = std::thread::Builder::new()
        .name("infusion-repl".into())
        .stack_size(STACK_BYTES)
        .spawn(move || infusion_repl::app::run(args));
    match run.map(|h| h.join()) {
        Ok(Ok(code)) => code,
        // The panic was reported by the hook; the thread could not start: run here.
        Ok(Err(_)) => std::process::ExitCode::from(101),
        Err(_) => infusion_repl::app::run(std::env::args_os()),
    }
}

/// Every tensor op allocates its output, and the sizes repeat each denoising step; glibc hands
/// blocks over its dynamic threshold (1-32 MiB) straight to mmap, so each such op paid page
/// faults and page clearing again (a tenth of the CPU time on SD1.5's shapes). Every block now
/// comes from the heap (no mmap: the feed-forward's 168 MiB outputs at batch 4 are reused
/// too; glibc still maps memory when the heap cannot grow), and none goes back to the system
/// by itself (trimming off): a training step frees and takes again ~10 GiB of activations on
/// SD1.5's shapes, and with freed memory over 512 MiB trimmed, clearing the pages again was
/// 8% of the step. A UNet call at batch 4 took 8%, then 5% less here, with the same peak
/// memory (notes/cpu.md). Each REPL input hands the freed memory back when it ends
/// (`util::memory::release_freed`), as bench does before each row.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's allocation thresholds; called before any thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_MMAP_MAX, 0);
        // One arena, the heap's: the work runs on a spawned thread, whose own arena (64 MiB
        // heaps) maps every larger block anyway and unmaps it when freed.
        libc::mallopt(libc::M_ARENA_MAX, 1);
        // -1: never trim (mallopt(3)).
        libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
    }
}
