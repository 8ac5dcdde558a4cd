//! The tether binary: `tether edge|worker|shard|dev|certs|status`. Parsing, telemetry and one library
//! call per subcommand; exit codes 64 (bad usage or config), 70 (shutdown deadline), 1.

mod certs;
mod cli;
mod dev;
mod status;

use std::process::ExitCode;

use clap::Parser;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let args = cli::Cli::parse();
    let telemetry = match tether_common::telemetry::init(&args.command.telemetry()) {
        Ok(telemetry) => telemetry,
        Err(error) => {
            eprintln!("tether: {error}");
            return ExitCode::from(64);
        }
    };
    let code = match cli::run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "tether exited with an error");
            ExitCode::from(cli::exit_code(&error))
        }
    };
    if let Some(telemetry) = telemetry {
        // The last batch of spans; the exporter blocks, so off the async workers.
        let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    }
    code
}
