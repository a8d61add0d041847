//! The `sealdisk` command: everything is in the library (`sealdisk::cli_main`).

fn main() -> std::process::ExitCode {
    sealdisk::cli_main()
}
