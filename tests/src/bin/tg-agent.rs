//! The `gateway-agent` CLI, built inside the test package so that suites run the agent
//! of the tree under test (`env!("CARGO_BIN_EXE_tg-agent")`).

fn main() -> std::process::ExitCode {
    gateway_agent::cli::main()
}
