//! `tether-loadtest`: simulated agents running tool-calling workflows against tether, once per
//! mode (`ws`, `http-chained`, `http-full`, `direct`), reporting latency percentiles. It runs
//! on its own multi-threaded runtime, separate from any server.
//!
//! Exit codes: 0 when every mode completed at least one workflow, 1 otherwise, 64 for bad
//! flags or configuration.

mod chart;
mod config;
mod cpu;
mod driver;
mod output;
mod report;
mod runner;
mod scenario;
mod stats;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = config::Args::parse();
    let config = match config::Config::try_from(args) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("error: {error:#}");
            return ExitCode::from(64);
        }
    };
    eprintln!("tether-loadtest {}", output::settings_line(&config));
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("loadtest").build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: starting the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let runs = runtime.block_on(runner::run(&config));
    drop(runtime);
    match output::emit(&config, &runs) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
