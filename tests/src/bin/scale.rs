//! `tether-scale`: the many-node run in one process (docs/scale.md). Starts an in-process
//! cluster, creates the sessions, makes the membership changes and prints the report.

use std::time::Duration;

use clap::Parser;
use tether_tests::scale::{Change, ScaleConfig};

#[derive(Debug, Parser)]
#[command(about = "Many workers and shards in one process: sessions, membership changes, what they cost")]
struct Args {
    #[arg(long, env = "TETHER_SCALE_WORKERS", default_value_t = 64)]
    workers: usize,
    #[arg(long, env = "TETHER_SCALE_SHARDS", default_value_t = 16)]
    shards: usize,
    #[arg(long, env = "TETHER_SCALE_SESSIONS", default_value_t = 100_000)]
    sessions: usize,
    /// One session in this many takes turns around each change.
    #[arg(long, env = "TETHER_SCALE_ACTIVE_EVERY", default_value_t = 10)]
    active_every: usize,
    /// Turns in flight at once.
    #[arg(long, env = "TETHER_SCALE_CONCURRENCY", default_value_t = 64)]
    concurrency: usize,
    #[arg(long, env = "TETHER_SCALE_OUTPUT_TOKENS", default_value_t = 4)]
    output_tokens: u32,
    /// Idle WebSockets opened to measure the edge's memory per connection.
    #[arg(long, env = "TETHER_SCALE_WEBSOCKETS", default_value_t = 2_000)]
    websockets: usize,
    /// Ring sizes whose build time, lookup time and memory are reported besides the run's own.
    #[arg(long, env = "TETHER_SCALE_RING_SIZES", value_delimiter = ',', default_value = "256,1000,10000")]
    ring_sizes: Vec<usize>,
    /// The whole run's deadline.
    #[arg(long, env = "TETHER_SCALE_TIME_LIMIT", value_parser = humantime::parse_duration, default_value = "20m")]
    time_limit: Duration,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let config = ScaleConfig {
        workers: args.workers,
        shards: args.shards,
        sessions: args.sessions,
        active_every: args.active_every,
        concurrency: args.concurrency,
        output_tokens: args.output_tokens,
        websockets: args.websockets,
        ring_sizes: args.ring_sizes,
    };
    println!("{config:?}");
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let run = async { tokio::time::timeout(args.time_limit, tether_tests::scale::run(&config, &Change::ALL)).await };
    match runtime.block_on(run) {
        Ok(report) => {
            println!("{report}");
            std::process::ExitCode::SUCCESS
        }
        Err(_) => {
            eprintln!("the run did not finish within {:?}", args.time_limit);
            std::process::ExitCode::from(70)
        }
    }
}
