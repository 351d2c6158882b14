fn main() -> std::process::ExitCode {
    infusion_repl::app::cli::run(std::env::args_os())
}
