/// Weights are used in place in their memory-mapped files (see `util::mapped`): this allocator
/// releases them when the model is dropped.
#[global_allocator]
static ALLOC: infusion_repl::util::mapped::MappedAlloc = infusion_repl::util::mapped::MappedAlloc;

fn main() -> std::process::ExitCode {
    infusion_repl::app::cli::run(std::env::args_os())
}
