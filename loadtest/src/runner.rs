//! Runs the workload once per mode, sequentially, so the modes' numbers are comparable.
//!
//! Closed loop: `--agents` tasks, each running workflows back to back on its own connection.
//! Open loop: a workflow (with its own agent) starts every `1/--rate` seconds; an arrival that
//! finds `--max-in-flight` workflows running is dropped and counted. Either way no workflow
//! starts after `--duration` or beyond `--workflows`, and workflows still running
//! `--request-timeout` after the deadline are cancelled and counted.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use tokio::task::JoinSet;

use crate::config::{Config, Load, Mode};
use crate::cpu::{CpuWatch, ProcessCpu};
use crate::driver::{Agent, ModeContext, run_workflow};
use crate::stats::{Recorder, Stats};

/// The outcome of one mode.
pub struct ModeRun {
    pub mode: Mode,
    pub elapsed: Duration,
    pub stats: Stats,
    /// CPU spent by the watched processes (and the generator) during the measured phase.
    pub cpu: Vec<ProcessCpu>,
    /// Why the mode could not start (e.g. no shard address for `direct`).
    pub skipped: Option<String>,
}

pub async fn run(config: &Config) -> Vec<ModeRun> {
    let mut runs = Vec::new();
    for &mode in &config.modes {
        let run = match ModeContext::new(config, mode).await {
            Ok(ctx) => run_mode(ctx).await,
            Err(error) => {
                eprintln!("warning: skipping mode {}: {error:#}", mode.name());
                ModeRun {
                    mode,
                    elapsed: Duration::ZERO,
                    stats: Stats::default(),
                    cpu: Vec::new(),
                    skipped: Some(format!("{error:#}")),
                }
            }
        };
        if run.skipped.is_none() {
            eprintln!("{}", summary_line(&run));
        }
        runs.push(run);
    }
    runs
}

async fn run_mode(ctx: Arc<ModeContext>) -> ModeRun {
    let config = &ctx.config;
    warm_up(&ctx).await;
    let recorder = Recorder::default();
    let progress = progress_bar(config, ctx.mode);
    let cpu_watch = CpuWatch::new(config.cpu.clone());
    let cpu_before = cpu_watch.snapshot();
    let started = Instant::now();
    let deadline = started + config.duration;
    let mut tasks = JoinSet::new();
    match config.load {
        Load::Closed { agents } => {
            let agents = (agents as u64).min(config.workflows);
            spawn_closed_loop(&mut tasks, &ctx, &recorder, &progress, agents, 0..config.workflows, deadline);
        }
        Load::Open { rate, max_in_flight } => {
            let interval = Duration::from_secs_f64(1.0 / rate);
            for index in 0..config.workflows {
                let due = started + interval.mul_f64(index as f64);
                if due >= deadline {
                    break;
                }
                tokio::time::sleep_until(due.into()).await;
                while tasks.try_join_next().is_some() {}
                if tasks.len() >= max_in_flight {
                    recorder.lock().record_event("dropped_arrival");
                    continue;
                }
                let (ctx, recorder, progress) = (ctx.clone(), recorder.clone(), progress.clone());
                tasks.spawn(async move {
                    let mut agent = Agent::new(&ctx);
                    let plan = ctx.config.workload.workflow(index);
                    run_workflow(&mut agent, &ctx, &plan, &recorder).await;
                    tick(&progress, &recorder);
                    agent.close().await;
                });
            }
        }
    }
    let hard_stop = deadline.max(Instant::now()) + config.request_timeout;
    let drained = tokio::time::timeout_at(hard_stop.into(), async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        let cancelled = tasks.len();
        tasks.abort_all();
        let mut stats = recorder.lock();
        for _ in 0..cancelled {
            stats.record_event("cancelled_at_deadline");
            stats.record_workflow(Duration::ZERO, false);
        }
    }
    let elapsed = started.elapsed();
    let cpu = cpu_watch.spent(&cpu_before, &cpu_watch.snapshot());
    progress.finish_and_clear();
    drop(tasks);
    let stats = Arc::try_unwrap(recorder).map(|m| m.into_inner()).unwrap_or_else(|shared| {
        // An aborted task may still hold a clone until it is dropped; take the data instead.
        std::mem::take(&mut *shared.lock())
    });
    ModeRun { mode: ctx.mode, elapsed, stats, cpu, skipped: None }
}

/// Workflow indices of the warm-up, far from the measured ones (their conversations differ).
const WARMUP_FIRST_INDEX: u64 = 1 << 62;

/// Runs `--warmup` unrecorded workflows so that the first mode does not pay for cold
/// connections, caches and allocators on the server.
async fn warm_up(ctx: &Arc<ModeContext>) {
    let config = &ctx.config;
    if config.warmup == 0 {
        return;
    }
    let concurrency = match config.load {
        Load::Closed { agents } => agents as u64,
        Load::Open { .. } => 4,
    };
    let recorder = Recorder::default();
    let mut tasks = JoinSet::new();
    let indices = WARMUP_FIRST_INDEX..WARMUP_FIRST_INDEX + config.warmup;
    let deadline = Instant::now() + config.duration;
    let agents = concurrency.min(config.warmup);
    spawn_closed_loop(&mut tasks, ctx, &recorder, &ProgressBar::hidden(), agents, indices, deadline);
    let hard_stop = deadline + config.request_timeout;
    let drained = tokio::time::timeout_at(hard_stop.into(), async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tasks.abort_all();
    }
    let stats = recorder.lock();
    if stats.workflows_ok == 0 {
        let first = stats.first_error.as_deref().unwrap_or("none finished");
        eprintln!("warning: {} warm-up failed: {first}", ctx.mode.name());
    }
}

/// Spawns `agents` closed-loop agents that share the workflow `indices` and start none after
/// `deadline`; each agent keeps its connection across its workflows.
fn spawn_closed_loop(
    tasks: &mut JoinSet<()>,
    ctx: &Arc<ModeContext>,
    recorder: &Recorder,
    progress: &ProgressBar,
    agents: u64,
    indices: Range<u64>,
    deadline: Instant,
) {
    let next = Arc::new(AtomicU64::new(indices.start));
    for _ in 0..agents {
        let (ctx, recorder, next, progress) = (ctx.clone(), recorder.clone(), next.clone(), progress.clone());
        let end = indices.end;
        tasks.spawn(async move {
            let mut agent = Agent::new(&ctx);
            while Instant::now() < deadline {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= end {
                    break;
                }
                let plan = ctx.config.workload.workflow(index);
                run_workflow(&mut agent, &ctx, &plan, &recorder).await;
                tick(&progress, &recorder);
            }
            agent.close().await;
        });
    }
}

fn progress_bar(config: &Config, mode: Mode) -> ProgressBar {
    if !config.outputs.progress {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(config.workflows);
    let style = ProgressStyle::with_template("{prefix:>12} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}")
        .expect("valid progress template");
    bar.set_style(style);
    bar.set_prefix(mode.name());
    bar.enable_steady_tick(Duration::from_millis(250));
    bar
}

fn tick(progress: &ProgressBar, recorder: &Recorder) {
    let (ok, errors) = {
        let stats = recorder.lock();
        (stats.workflows_ok, stats.error_count())
    };
    progress.inc(1);
    progress.set_message(format!("ok {ok} errors {errors}"));
}

fn summary_line(run: &ModeRun) -> String {
    let stats = &run.stats;
    let mut line = format!(
        "{}: {} workflows ok, {} failed, {} turns in {:.1}s",
        run.mode.name(),
        stats.workflows_ok,
        stats.workflows_failed,
        stats.turns_ok,
        run.elapsed.as_secs_f64()
    );
    if let Some(first) = &stats.first_error {
        line.push_str(&format!("; first error: {first}"));
    }
    line
}
