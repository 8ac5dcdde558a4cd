//! Command-line flags (`Args`, every flag also readable from `TETHER_LOADTEST_*`) and the
//! validated run configuration (`Config`) the rest of the crate uses.
//!
//! Every load loop is bounded twice: by a workflow count and by a duration.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};

use crate::cpu::CpuTarget;
use crate::scenario::{LatencyDist, WorkloadConfig};

/// How a mode drives tether.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// One WebSocket per agent; follow-ups carry `previous_response_id` + new items.
    Ws,
    /// SSE over a new HTTP connection per request, chained with `previous_response_id`.
    HttpChained,
    /// Stateless SSE (`store:false`), the full history every turn, new connection per request.
    HttpFull,
    /// `http-full` without `prompt_cache_key`: the server places it by its content alone.
    HttpFullKeyless,
    /// gRPC straight to a shard (no edge, no worker): the floor.
    Direct,
    /// Every mode above but `http-full-keyless`, in that order.
    All,
}

impl Mode {
    pub const EVERY: [Mode; 4] = [Mode::Ws, Mode::HttpChained, Mode::HttpFull, Mode::Direct];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Ws => "ws",
            Mode::HttpChained => "http-chained",
            Mode::HttpFull => "http-full",
            Mode::HttpFullKeyless => "http-full-keyless",
            Mode::Direct => "direct",
            Mode::All => "all",
        }
    }
}

#[derive(Debug, Parser)]
#[command(name = "tether-loadtest", version, about = "Agent-loop load generator for tether")]
pub struct Args {
    /// Base URL of a tether edge (HTTP; the WebSocket URL is derived from it).
    #[arg(long, env = "TETHER_LOADTEST_URL", default_value = "http://127.0.0.1:8080", help_heading = "Target")]
    pub url: String,
    /// Bearer key sent on every request and WebSocket handshake.
    #[arg(long, env = "TETHER_LOADTEST_API_KEY", default_value = "sk-local", help_heading = "Target")]
    pub api_key: String,
    #[arg(long, env = "TETHER_LOADTEST_MODEL", default_value = "tether-sim", help_heading = "Target")]
    pub model: String,
    /// Shard address for `direct` (default: discovered from `GET {url}/v1/cluster`).
    #[arg(long, env = "TETHER_LOADTEST_SHARD", help_heading = "Target")]
    pub shard: Option<String>,

    /// Modes to run, sequentially, with the same workload (repeatable or comma-separated).
    #[arg(
        long,
        env = "TETHER_LOADTEST_MODE",
        value_enum,
        value_delimiter = ',',
        default_value = "all",
        help_heading = "Load"
    )]
    pub mode: Vec<Mode>,
    /// Closed loop: this many agents, each running workflows back to back.
    #[arg(long, env = "TETHER_LOADTEST_AGENTS", conflicts_with = "rate", help_heading = "Load")]
    pub agents: Option<usize>,
    /// Open loop: start this many workflows per second (each its own agent).
    #[arg(long, env = "TETHER_LOADTEST_RATE", help_heading = "Load")]
    pub rate: Option<f64>,
    /// Open loop: arrivals beyond this many workflows in flight are dropped and counted.
    #[arg(long, env = "TETHER_LOADTEST_MAX_IN_FLIGHT", default_value_t = 512, help_heading = "Load")]
    pub max_in_flight: usize,
    /// Workflows per mode (upper bound).
    #[arg(long, env = "TETHER_LOADTEST_WORKFLOWS", default_value_t = 100, help_heading = "Load")]
    pub workflows: u64,
    /// Unrecorded workflows run before each mode's measurement (cold server paths).
    #[arg(long, env = "TETHER_LOADTEST_WARMUP", default_value_t = 8, help_heading = "Load")]
    pub warmup: u64,
    /// Time per mode (upper bound); in-flight workflows then get `--request-timeout` to finish.
    #[arg(long, env = "TETHER_LOADTEST_DURATION", default_value = "60s", help_heading = "Load")]
    pub duration: humantime::Duration,
    /// Timeout of one model call (one turn).
    #[arg(long, env = "TETHER_LOADTEST_REQUEST_TIMEOUT", default_value = "30s", help_heading = "Load")]
    pub request_timeout: humantime::Duration,

    /// Tool turns per workflow (model call → tool → output → …), then a final answer.
    #[arg(long, env = "TETHER_LOADTEST_TURNS", default_value_t = 5, help_heading = "Workflow")]
    pub turns: u32,
    /// Simulated tool run time: `fixed:50ms` or `uniform:20ms..80ms`.
    #[arg(long, env = "TETHER_LOADTEST_TOOL_LATENCY", default_value = "fixed:50ms", help_heading = "Workflow")]
    pub tool_latency: LatencyDist,
    /// Approximate size of the first user message, in tokens.
    #[arg(long, env = "TETHER_LOADTEST_INPUT_TOKENS", default_value_t = 1000, help_heading = "Workflow")]
    pub input_tokens: usize,
    /// Size of each tool output in bytes (the conversation grows by this per turn).
    #[arg(long, env = "TETHER_LOADTEST_TOOL_OUTPUT_BYTES", default_value_t = 2000, help_heading = "Workflow")]
    pub tool_output_bytes: usize,
    /// Length of the model's final answer, in tokens.
    #[arg(long, env = "TETHER_LOADTEST_OUTPUT_TOKENS", default_value_t = 100, help_heading = "Workflow")]
    pub output_tokens: u32,
    /// Seed of the filler text and tool latencies (random and logged when absent).
    #[arg(long, env = "TETHER_LOADTEST_SEED", help_heading = "Workflow")]
    pub seed: Option<u64>,

    /// Processes whose CPU time (`/proc/PID/stat`) is reported per mode and per turn:
    /// `PID` or `LABEL=PID` (repeatable or comma-separated).
    #[arg(long, env = "TETHER_LOADTEST_CPU_PID", value_delimiter = ',', help_heading = "Output")]
    pub cpu_pid: Vec<CpuTarget>,
    /// Write the full report as JSON.
    #[arg(long, env = "TETHER_LOADTEST_JSON", help_heading = "Output")]
    pub json: Option<PathBuf>,
    /// Write the Markdown tables to a file (they are always printed to stdout).
    #[arg(long, env = "TETHER_LOADTEST_MARKDOWN", help_heading = "Output")]
    pub markdown: Option<PathBuf>,
    /// Write a PNG latency chart.
    #[arg(long, env = "TETHER_LOADTEST_CHART", help_heading = "Output")]
    pub chart: Option<PathBuf>,
    /// TTF font for the chart (default: DejaVu Sans or Liberation Sans if installed).
    #[arg(long, env = "TETHER_LOADTEST_FONT", help_heading = "Output")]
    pub font: Option<PathBuf>,
    /// Hide the progress bar.
    #[arg(long, env = "TETHER_LOADTEST_QUIET", help_heading = "Output")]
    pub quiet: bool,
}

/// Closed or open loop.
#[derive(Clone, Copy, Debug, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Load {
    Closed { agents: usize },
    Open { rate: f64, max_in_flight: usize },
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Target {
    pub http_url: String,
    pub ws_url: String,
    #[serde(skip)]
    pub api_key: String,
    pub model: String,
    pub shard: Option<String>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Outputs {
    pub json: Option<PathBuf>,
    pub markdown: Option<PathBuf>,
    pub chart: Option<PathBuf>,
    pub font: Option<PathBuf>,
    pub progress: bool,
}

/// The validated configuration of one run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Config {
    pub target: Target,
    pub modes: Vec<Mode>,
    pub load: Load,
    pub workflows: u64,
    pub warmup: u64,
    #[serde(with = "duration_ms", rename = "duration_ms")]
    pub duration: Duration,
    #[serde(with = "duration_ms", rename = "request_timeout_ms")]
    pub request_timeout: Duration,
    pub workload: WorkloadConfig,
    /// Processes whose CPU time is measured around each mode.
    pub cpu: Vec<CpuTarget>,
    #[serde(skip)]
    pub outputs: Outputs,
}

impl TryFrom<Args> for Config {
    type Error = anyhow::Error;

    fn try_from(args: Args) -> anyhow::Result<Self> {
        let http_url = args.url.trim_end_matches('/').to_owned();
        let ws_url = ws_url(&http_url)?;
        let mut modes: Vec<Mode> =
            if args.mode.contains(&Mode::All) { Mode::EVERY.to_vec() } else { args.mode.clone() };
        let mut seen = Vec::new();
        modes.retain(|mode| {
            let first = !seen.contains(mode);
            seen.push(*mode);
            first
        });
        let load = match (args.agents, args.rate) {
            (_, Some(rate)) if !(rate > 0.0 && rate.is_finite()) => bail!("--rate must be > 0"),
            (_, Some(rate)) => Load::Open { rate, max_in_flight: args.max_in_flight.max(1) },
            (Some(0), None) => bail!("--agents must be > 0"),
            (agents, None) => Load::Closed { agents: agents.unwrap_or(8) },
        };
        if args.workflows == 0 {
            bail!("--workflows must be > 0");
        }
        let seed = args.seed.unwrap_or_else(rand::random);
        Ok(Config {
            target: Target {
                http_url,
                ws_url,
                api_key: args.api_key,
                model: args.model,
                shard: args.shard.map(|s| s.trim_end_matches('/').to_owned()),
            },
            modes,
            load,
            workflows: args.workflows,
            warmup: args.warmup,
            duration: args.duration.into(),
            request_timeout: args.request_timeout.into(),
            workload: WorkloadConfig {
                turns: args.turns,
                tool_latency: args.tool_latency,
                input_tokens: args.input_tokens,
                tool_output_bytes: args.tool_output_bytes,
                output_tokens: args.output_tokens,
                seed,
            },
            cpu: args.cpu_pid,
            outputs: Outputs {
                json: args.json,
                markdown: args.markdown,
                chart: args.chart,
                font: args.font,
                progress: !args.quiet,
            },
        })
    }
}

/// Maps `http(s)://host/base` to `ws(s)://host/base/v1/responses`, as the SDK does.
fn ws_url(http_url: &str) -> anyhow::Result<String> {
    let (scheme, rest) = http_url.split_once("://").context("--url needs a scheme")?;
    let ws_scheme = match scheme {
        "http" => "ws",
        "https" => "wss",
        other => bail!("--url scheme {other:?} is not http or https"),
    };
    Ok(format!("{ws_scheme}://{rest}/v1/responses"))
}

mod duration_ms {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64() * 1e3)
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::{Args, Config, Load, Mode};

    #[test]
    fn all_expands_and_urls_derive() {
        let args = Args::parse_from(["lt", "--url", "http://h:1/", "--mode", "all", "--rate", "2"]);
        let config = Config::try_from(args).unwrap();
        assert_eq!(config.modes, Mode::EVERY.to_vec());
        assert_eq!(config.target.ws_url, "ws://h:1/v1/responses");
        assert!(matches!(config.load, Load::Open { .. }));
    }

    #[test]
    fn modes_may_repeat_or_be_comma_separated() {
        let args = Args::parse_from(["lt", "--mode", "ws,direct", "--mode", "http-full"]);
        let config = Config::try_from(args).unwrap();
        assert_eq!(config.modes, vec![Mode::Ws, Mode::Direct, Mode::HttpFull]);
        assert!(matches!(config.load, Load::Closed { agents: 8 }));
    }

    #[test]
    fn cpu_pids_take_optional_labels() {
        let args = Args::parse_from(["lt", "--cpu-pid", "tether=10,11", "--cpu-pid", "router=12"]);
        let config = Config::try_from(args).unwrap();
        let labels: Vec<String> = config.cpu.iter().map(|t| t.to_string()).collect();
        assert_eq!(labels, ["tether=10", "pid 11=11", "router=12"]);
    }
}
