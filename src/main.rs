fn main() -> std::process::ExitCode {
    infusion::cli::run(std::env::args_os())
}
