//! A scale run's results and their Markdown rendering (the tables in docs/scale.md).

use std::fmt;
use std::time::Duration;

use super::measure::{Counters, Held};
use super::{Change, ScaleConfig};

/// What one membership change cost.
#[derive(Debug)]
pub struct ChangeReport {
    pub change: Change,
    /// The node that joined or left.
    pub node: String,
    pub members_before: usize,
    pub members_after: usize,
    pub sessions: usize,
    /// Sessions whose owner on the ring changed.
    pub moved: usize,
    /// What consistent hashing promises: 1/N of the larger membership.
    pub expected_fraction: f64,
    /// Moves that neither came to the joiner nor left the leaver (consistent hashing: 0).
    pub foreign_moves: usize,
    pub active: usize,
    /// Active sessions whose serving worker changed.
    pub active_moved: usize,
    /// Active sessions last served by a worker other than their owner on the new ring.
    pub misrouted: usize,
    pub failed_during: Vec<String>,
    pub failed_after: Vec<String>,
    pub counters: Counters,
    /// Receivers woken by the change in the membership store.
    pub watchers: usize,
    /// What the leaving worker held before it left.
    pub leaving_held: Option<Held>,
    /// The error the leaving node exited with (`None`: it drained cleanly or was killed).
    pub outcome: Option<String>,
    /// From the start of the change until it was done (a drain: until the node had exited).
    pub change_took: Duration,
    /// The sweep after the change: every active session meets its new owner.
    pub sweep_after: Duration,
}

impl ChangeReport {
    pub fn moved_fraction(&self) -> f64 {
        self.moved as f64 / self.sessions.max(1) as f64
    }

    pub fn failed(&self) -> usize {
        self.failed_during.len() + self.failed_after.len()
    }
}

/// What a ring of one size costs.
#[derive(Debug)]
pub struct RingCosts {
    pub nodes: usize,
    /// Built from scratch.
    pub build: Duration,
    /// Rebuilt from the previous ring when one node joins.
    pub rebuild_on_join: Duration,
    /// Listing a key's first four holders (a pull's first step).
    pub holders_lookup: Duration,
    /// Its bytes once successors were asked for every owner.
    pub bytes: u64,
}

#[derive(Debug)]
pub struct ScaleReport {
    pub config: ScaleConfig,
    pub start_seconds: f64,
    pub sessions: usize,
    pub create_failures: Vec<String>,
    pub create_seconds: f64,
    /// Resident memory of the started cluster, before any session.
    pub rss_cluster: u64,
    /// Resident memory growth per session created (every node and the client together).
    pub rss_per_session: f64,
    /// State the workers hold after the sessions were created (owners' copies and replicas).
    pub held: Held,
    /// The busiest worker's sessions over the mean.
    pub spread: f64,
    pub websocket_bytes: Option<f64>,
    pub ring_build: Vec<RingCosts>,
    pub changes: Vec<ChangeReport>,
}

impl ScaleReport {
    pub fn change(&self, change: Change) -> Option<&ChangeReport> {
        self.changes.iter().find(|report| report.change == change)
    }
}

fn kib(bytes: f64) -> String {
    format!("{:.1} KiB", bytes / 1024.0)
}

impl fmt::Display for ScaleReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        writeln!(
            f,
            "{} workers, {} shards, {} sessions ({} failed to create), 1 in {} active, {} turns in flight",
            c.workers,
            c.shards,
            self.sessions,
            self.create_failures.len(),
            c.active_every,
            c.concurrency
        )?;
        writeln!(f)?;
        writeln!(f, "| setup | value |")?;
        writeln!(f, "|---|---|")?;
        writeln!(
            f,
            "| cluster start | {:.2} s, {:.0} MiB resident |",
            self.start_seconds,
            self.rss_cluster as f64 / 1048576.0
        )?;
        writeln!(
            f,
            "| sessions created | {:.1} s ({:.0} turns/s) |",
            self.create_seconds,
            self.sessions as f64 / self.create_seconds.max(1e-9)
        )?;
        writeln!(f, "| resident memory per session (whole process) | {} |", kib(self.rss_per_session))?;
        writeln!(
            f,
            "| state held by workers | {} entries ({:.2} per session), {} per entry |",
            self.held.entries,
            self.held.entries as f64 / self.sessions.max(1) as f64,
            kib(super::bytes_per_entry(&self.held))
        )?;
        writeln!(f, "| busiest worker / mean sessions | {:.2} |", self.spread)?;
        if let Some(bytes) = self.websocket_bytes {
            writeln!(f, "| resident memory per idle WebSocket (edge and client) | {} |", kib(bytes))?;
        }
        for ring in &self.ring_build {
            writeln!(
                f,
                "| ring of {} nodes × 128 vnodes: build, rebuild on a join, holders lookup, memory | {:.2} ms, {:.2} ms, {:.1} µs, {} |",
                ring.nodes,
                ring.build.as_secs_f64() * 1e3,
                ring.rebuild_on_join.as_secs_f64() * 1e3,
                ring.holders_lookup.as_secs_f64() * 1e6,
                kib(ring.bytes as f64)
            )?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "| change | members | moved (1/N) | foreign moves | active moved | misrouted | failed turns | pulls (bytes) | leaver held | handed off (bytes) | replicated bytes | watchers / applied | change took | sweep after |"
        )?;
        writeln!(f, "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")?;
        for r in &self.changes {
            writeln!(
                f,
                "| {} | {}→{} | {:.2}% ({:.2}%) | {} | {}/{} | {} | {} | {} ({}) | {} | {} ({}) | {} | {} / {} | {:.2} s{} | {:.2} s |",
                r.change.name(),
                r.members_before,
                r.members_after,
                r.moved_fraction() * 100.0,
                r.expected_fraction * 100.0,
                r.foreign_moves,
                r.active_moved,
                r.active,
                r.misrouted,
                r.failed(),
                r.counters.pulls,
                kib(r.counters.pulled_bytes),
                r.leaving_held.map_or("–".to_owned(), |held| format!(
                    "{} ({})",
                    held.entries,
                    kib(held.bytes as f64)
                )),
                r.counters.handed_off,
                kib(r.counters.hand_off_bytes),
                kib(r.counters.replicate_bytes),
                r.watchers,
                r.counters.membership_applied,
                r.change_took.as_secs_f64(),
                r.outcome.as_ref().map_or(String::new(), |error| format!(" ({error})")),
                r.sweep_after.as_secs_f64(),
            )?;
        }
        for r in &self.changes {
            for failure in r.failed_during.iter().chain(&r.failed_after).take(5) {
                writeln!(f, "failed turn on '{}': {failure}", r.change.name())?;
            }
        }
        Ok(())
    }
}
