//! Where the report goes: Markdown to stdout (and `--markdown`), JSON to `--json`, the chart
//! to `--chart`; plus the settings line logged at start.

use anyhow::Context;

use crate::config::{Config, Load};
use crate::runner::ModeRun;
use crate::{chart, report};

/// Returns the one-line summary of the effective settings (the seed included, so a run can be
/// repeated exactly).
pub fn settings_line(config: &Config) -> String {
    let modes: Vec<&str> = config.modes.iter().map(|m| m.name()).collect();
    let load = match config.load {
        Load::Closed { agents } => format!("agents={agents}"),
        Load::Open { rate, max_in_flight } => format!("rate={rate}/s max_in_flight={max_in_flight}"),
    };
    let w = &config.workload;
    let cpu: Vec<String> = config.cpu.iter().map(|target| target.to_string()).collect();
    let cpu = if cpu.is_empty() { String::new() } else { format!(" cpu_pids={}", cpu.join(",")) };
    format!(
        "url={} modes={} {load} workflows={} warmup={} duration={} turns={} tool_latency={} input_tokens={} \
         tool_output_bytes={} output_tokens={} seed={}{cpu}",
        config.target.http_url,
        modes.join(","),
        config.workflows,
        config.warmup,
        humantime::format_duration(config.duration),
        w.turns,
        w.tool_latency,
        w.input_tokens,
        w.tool_output_bytes,
        w.output_tokens,
        w.seed
    )
}

/// Writes every output; returns whether every mode completed at least one workflow.
pub fn emit(config: &Config, runs: &[ModeRun]) -> anyhow::Result<bool> {
    let report = report::build(config, runs);
    let markdown = report::markdown(&report);
    println!("{markdown}");
    let outputs = &config.outputs;
    if let Some(path) = &outputs.markdown {
        std::fs::write(path, &markdown).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &outputs.json {
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &outputs.chart
        && let Err(error) = chart::draw(&report, path, outputs.font.as_deref())
    {
        eprintln!("warning: chart skipped: {error:#}");
    }
    Ok(report.modes.iter().all(|m| m.skipped.is_none() && m.workflows_ok > 0))
}
