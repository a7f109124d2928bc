//! `gateway-agent`: Tollgate's node agent and CLI (see `cli.rs`).

fn main() -> std::process::ExitCode {
    gateway_agent::cli::main()
}
