//! Turns each mode's raw measurements into the report: a serializable summary (written as
//! JSON) and Markdown tables (printed to stdout, optionally written to a file).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;

use crate::config::{Config, Load, Mode};
use crate::cpu::SELF_LABEL;
use crate::runner::ModeRun;

/// p50/p90/p99/max/mean of a histogram, scaled (µs → ms for latencies, 1 for bytes).
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    pub fn of(histogram: &Histogram<u64>, scale: f64) -> Option<Self> {
        if histogram.is_empty() {
            return None;
        }
        let at = |q| histogram.value_at_quantile(q) as f64 / scale;
        Some(Percentiles {
            count: histogram.len(),
            mean: histogram.mean() / scale,
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            max: histogram.max() as f64 / scale,
        })
    }
}

#[derive(Debug, serde::Serialize)]
pub struct ModeReport {
    pub mode: Mode,
    pub skipped: Option<String>,
    pub elapsed_s: f64,
    pub workflows_ok: u64,
    pub workflows_failed: u64,
    pub workflows_per_s: f64,
    pub turns_ok: u64,
    pub workflow_ms: Option<Percentiles>,
    pub turn_ms: Option<Percentiles>,
    pub ttft_ms: Option<Percentiles>,
    pub inter_token_ms: Option<Percentiles>,
    /// Turn time minus shard-reported engine time; `None` when the server reports no `x_tether`.
    pub router_overhead_ms: Option<Percentiles>,
    pub bytes_sent_per_turn: Option<Percentiles>,
    pub bytes_sent_total: u64,
    pub output_tokens: u64,
    pub output_tokens_per_s: f64,
    pub input_tokens_per_turn: Option<f64>,
    /// cached input tokens / input tokens, over the turns that reported usage.
    pub cached_token_ratio: Option<f64>,
    pub errors: BTreeMap<String, u64>,
    pub first_error: Option<String>,
    /// CPU of each `--cpu-pid` process, then the generator's own, over the measured phase.
    pub cpu: Vec<ProcessCpuReport>,
}

/// One process's CPU during a mode: in total and per successful turn.
#[derive(Debug, serde::Serialize)]
pub struct ProcessCpuReport {
    pub label: String,
    pub pid: Option<u32>,
    pub cpu_ms: Option<f64>,
    pub cpu_ms_per_turn: Option<f64>,
}

#[derive(Debug, serde::Serialize)]
pub struct Host {
    pub os: &'static str,
    pub arch: &'static str,
    pub cores: usize,
}

#[derive(Debug, serde::Serialize)]
pub struct Report {
    pub settings: Config,
    pub host: Host,
    pub modes: Vec<ModeReport>,
}

pub fn build(config: &Config, runs: &[ModeRun]) -> Report {
    let modes = runs.iter().map(summarize).collect();
    let host = Host {
        os: std::env::consts::OS,
        arch: std::env::consts::ARCH,
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
    };
    Report { settings: config.clone(), host, modes }
}

pub fn summarize(run: &ModeRun) -> ModeReport {
    let stats = &run.stats;
    let secs = run.elapsed.as_secs_f64();
    let per_s = |n: u64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
    let ratio = |a: u64, b: u64| (b > 0).then(|| a as f64 / b as f64);
    ModeReport {
        mode: run.mode,
        skipped: run.skipped.clone(),
        elapsed_s: secs,
        workflows_ok: stats.workflows_ok,
        workflows_failed: stats.workflows_failed,
        workflows_per_s: per_s(stats.workflows_ok),
        turns_ok: stats.turns_ok,
        workflow_ms: Percentiles::of(&stats.workflow, 1e3),
        turn_ms: Percentiles::of(&stats.turn, 1e3),
        ttft_ms: Percentiles::of(&stats.ttft, 1e3),
        inter_token_ms: Percentiles::of(&stats.inter_token, 1e3),
        router_overhead_ms: Percentiles::of(&stats.overhead, 1e3),
        bytes_sent_per_turn: Percentiles::of(&stats.bytes_sent, 1.0),
        bytes_sent_total: stats.bytes_sent_total,
        output_tokens: stats.output_tokens,
        output_tokens_per_s: per_s(stats.output_tokens),
        input_tokens_per_turn: ratio(stats.input_tokens, stats.turns_with_usage),
        cached_token_ratio: ratio(stats.cached_tokens, stats.input_tokens),
        errors: stats.errors.clone(),
        first_error: stats.first_error.clone(),
        cpu: run
            .cpu
            .iter()
            .map(|process| ProcessCpuReport {
                label: process.label.clone(),
                pid: process.pid,
                cpu_ms: process.cpu_ms,
                cpu_ms_per_turn: process.cpu_ms.filter(|_| stats.turns_ok > 0).map(|ms| ms / stats.turns_ok as f64),
            })
            .collect(),
    }
}

/// Renders the settings line and the summary and latency tables.
pub fn markdown(report: &Report) -> String {
    let s = &report.settings;
    let w = &s.workload;
    let load = match s.load {
        Load::Closed { agents } => format!("closed loop, {agents} agents"),
        Load::Open { rate, max_in_flight } => format!("open loop, {rate}/s (≤{max_in_flight} in flight)"),
    };
    let mut out = String::new();
    let _ = writeln!(out, "## tether-loadtest\n");
    let _ = writeln!(
        out,
        "Target `{}`, model `{}`; {load}; ≤{} workflows (after {} warm-up) and ≤{} per mode; {} tool turns, tool latency \
         {}, ~{} input tokens, {} B tool outputs, {} output tokens; seed {}; host {} {} × {} cores.\n",
        s.target.http_url,
        s.target.model,
        s.workflows,
        s.warmup,
        humantime::format_duration(s.duration),
        w.turns,
        w.tool_latency,
        w.input_tokens,
        w.tool_output_bytes,
        w.output_tokens,
        w.seed,
        report.host.os,
        report.host.arch,
        report.host.cores,
    );
    let baseline = report.modes.iter().find_map(|m| m.turn_ms.map(|t| t.p50));
    let _ = writeln!(
        out,
        "| mode | workflows/s | ok / failed | turn p50 ms (× first) | TTFT p50 / p99 ms | ITL p50 / p99 ms \
         | router overhead p50 / p99 ms | bytes sent / turn | output tok/s | cached | errors |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for m in &report.modes {
        if let Some(reason) = &m.skipped {
            let _ = writeln!(out, "| {} | skipped |{}| {} |", m.mode.name(), " |".repeat(8), reason.replace('|', "/"));
            continue;
        }
        let turn = match (m.turn_ms, baseline) {
            (Some(t), Some(b)) if b > 0.0 => format!("{} ({:.2}×)", ms(t.p50), t.p50 / b),
            (t, _) => opt(t, |t| ms(t.p50)),
        };
        let _ = writeln!(
            out,
            "| {} | {:.2} | {} / {} | {} | {} | {} | {} | {} | {:.0} | {} | {} |",
            m.mode.name(),
            m.workflows_per_s,
            m.workflows_ok,
            m.workflows_failed,
            turn,
            opt(m.ttft_ms, |p| format!("{} / {}", ms(p.p50), ms(p.p99))),
            opt(m.inter_token_ms, |p| format!("{} / {}", ms(p.p50), ms(p.p99))),
            opt(m.router_overhead_ms, |p| format!("{} / {}", ms(p.p50), ms(p.p99))),
            opt(m.bytes_sent_per_turn, |p| format!("{:.0}", p.mean)),
            m.output_tokens_per_s,
            m.cached_token_ratio.map_or("n/a".into(), |r| format!("{:.1}%", r * 100.0)),
            errors(&m.errors),
        );
    }
    if !s.cpu.is_empty() {
        cpu_table(&mut out, report);
    }
    let _ = writeln!(out, "\n| mode | metric | p50 | p90 | p99 | max | mean | n |");
    let _ = writeln!(out, "|---|---|---:|---:|---:|---:|---:|---:|");
    for m in report.modes.iter().filter(|m| m.skipped.is_none()) {
        let metrics = [
            ("workflow ms", m.workflow_ms),
            ("turn ms", m.turn_ms),
            ("TTFT ms", m.ttft_ms),
            ("inter-token ms", m.inter_token_ms),
            ("router overhead ms", m.router_overhead_ms),
        ];
        for (name, p) in metrics {
            match p {
                Some(p) => {
                    let _ = writeln!(
                        out,
                        "| {} | {name} | {} | {} | {} | {} | {} | {} |",
                        m.mode.name(),
                        ms(p.p50),
                        ms(p.p90),
                        ms(p.p99),
                        ms(p.max),
                        ms(p.mean),
                        p.count
                    );
                }
                None => {
                    let _ = writeln!(out, "| {} | {name} | n/a | n/a | n/a | n/a | n/a | 0 |", m.mode.name());
                }
            }
        }
    }
    out
}

/// Renders CPU per turn for each watched process and mode; where a `direct` run watched the
/// same process, the difference to it is what the router itself costs per turn.
fn cpu_table(out: &mut String, report: &Report) {
    let direct = report.modes.iter().find(|m| m.mode == Mode::Direct && m.skipped.is_none());
    let direct_per_turn =
        |label: &str| direct.and_then(|d| d.cpu.iter().find(|p| p.label == label)).and_then(|p| p.cpu_ms_per_turn);
    let _ = writeln!(out, "\n| mode | process | CPU ms | turns | CPU ms / turn | − `direct` ms / turn |");
    let _ = writeln!(out, "|---|---|---:|---:|---:|---:|");
    for m in report.modes.iter().filter(|m| m.skipped.is_none()) {
        for p in &m.cpu {
            let over_direct = match (p.cpu_ms_per_turn, direct_per_turn(&p.label)) {
                (Some(own), Some(floor)) if m.mode != Mode::Direct && p.label != SELF_LABEL => {
                    format!("{:.3}", own - floor)
                }
                _ => "".to_owned(),
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {over_direct} |",
                m.mode.name(),
                p.label,
                p.cpu_ms.map_or("n/a".into(), |ms| format!("{ms:.0}")),
                m.turns_ok,
                p.cpu_ms_per_turn.map_or("n/a".into(), |ms| format!("{ms:.3}")),
            );
        }
    }
}

/// Formats milliseconds with three significant-ish digits.
fn ms(v: f64) -> String {
    if v < 10.0 {
        format!("{v:.2}")
    } else if v < 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}

fn opt<T>(value: Option<T>, f: impl FnOnce(T) -> String) -> String {
    value.map_or_else(|| "n/a".to_owned(), f)
}

fn errors(errors: &BTreeMap<String, u64>) -> String {
    if errors.is_empty() {
        return "0".into();
    }
    errors.iter().map(|(class, n)| format!("{class} ×{n}")).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{Percentiles, summarize};
    use crate::config::Mode;
    use crate::cpu::ProcessCpu;
    use crate::runner::ModeRun;
    use crate::stats::{Stats, TurnSample};

    #[test]
    fn percentiles_scale_microseconds_to_milliseconds() {
        let mut h = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).unwrap();
        for v in 1..=100u64 {
            h.record(v * 1000).unwrap();
        }
        let p = Percentiles::of(&h, 1e3).unwrap();
        assert_eq!(p.count, 100);
        assert!((p.p50 - 50.0).abs() < 0.1 && (p.p99 - 99.0).abs() < 0.1, "{p:?}");
        assert!((p.mean - 50.5).abs() < 0.1);
    }

    #[test]
    fn summary_rates_and_ratios() {
        let mut stats = Stats::default();
        let sample = TurnSample {
            total: Duration::from_millis(20),
            input_tokens: Some(1000),
            cached_tokens: Some(750),
            output_tokens: Some(50),
            bytes_sent: 100,
            ..TurnSample::default()
        };
        for _ in 0..4 {
            stats.record_turn(&sample);
        }
        stats.record_workflow(Duration::from_millis(100), true);
        stats.record_workflow(Duration::from_millis(100), true);
        let cpu = vec![
            ProcessCpu { label: "tether".into(), pid: Some(1), cpu_ms: Some(8.0) },
            ProcessCpu { label: "gone".into(), pid: Some(2), cpu_ms: None },
        ];
        let run = ModeRun { mode: Mode::Ws, elapsed: Duration::from_secs(2), stats, cpu, skipped: None };
        let report = summarize(&run);
        assert_eq!(report.cpu[0].cpu_ms_per_turn, Some(2.0), "8 ms over 4 turns");
        assert_eq!(report.cpu[1].cpu_ms_per_turn, None);
        assert_eq!(report.workflows_per_s, 1.0);
        assert_eq!(report.output_tokens_per_s, 100.0);
        assert_eq!(report.cached_token_ratio, Some(0.75));
        assert_eq!(report.input_tokens_per_turn, Some(1000.0));
        assert!(report.router_overhead_ms.is_none(), "no engine time reported means n/a");
    }
}
