//! The `keygate` binary: parse the command line, load the configuration, run.

use std::process::ExitCode;

use clap::Parser;
use keygate::cli::{Cli, Command};
use keygate::config::Config;

/// mimalloc: the request path allocates a lot (HTTP, JSON, SQL); glibc malloc was about
/// 10% of server CPU under load (docs/benchmarks-server-cpu.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn init_tracing(command: &Command) {
    let default = match command {
        Command::Serve => "info",
        // tss-esapi logs the TPM errors `keygate enroll` reports itself, in one line.
        Command::Enroll(_) => "warn,tss_esapi=off",
        Command::Bench(b) if b.enroll_tcti.is_some() => "warn,tss_esapi=off",
        _ => "warn",
    };
    keygate::cli::logging::init(default);
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("keygate: error: {e}");
            return ExitCode::FAILURE;
        }
    };
    if config.is_embedded() && !matches!(cli.command, Command::Verify(_)) {
        // The embedded SoftHSM2 token reads its configuration from SOFTHSM2_CONF when the
        // module initialises. SAFETY: no other thread exists yet (the runtime starts below).
        unsafe { std::env::set_var("SOFTHSM2_CONF", config.embedded_softhsm_conf()) };
    }
    let tpm_client = matches!(&cli.command, Command::Enroll(_))
        || matches!(&cli.command, Command::Bench(b) if b.enroll_tcti.is_some());
    if tpm_client && std::env::var_os("TSS2_LOG").is_none() {
        // tpm2-tss prints its own errors to stderr; the TPM client commands report them.
        // SAFETY: no other thread exists yet.
        unsafe { std::env::set_var("TSS2_LOG", "all+none") };
    }
    init_tracing(&cli.command);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if matches!(cli.command, Command::Serve) && std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        builder.worker_threads(config.http.worker_threads(cores));
    }
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("keygate: error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(keygate::cli::run(cli, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and its causes.
            let line = format!("{e:#}").replace('\n', " ");
            eprintln!("keygate: error: {line}");
            ExitCode::FAILURE
        }
    }
}
