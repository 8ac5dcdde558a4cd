//! The edge's own turn statistics for the operator view (`/v1/cluster/status`, `/dashboard`,
//! `tether status`): turns, outcomes, time to first event, worker errors by class and session
//! moves, in one-second buckets over the last two minutes plus totals since start.
//!
//! The Prometheus metrics say the same things, but their recorder is process-global (`tether
//! dev` and the in-process tests run several services in one process) and a histogram's
//! buckets give coarse percentiles, so the edge counts for itself here: a few atomics-worth of
//! work under one short lock per turn.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use serde::Serialize;

/// Seconds of per-second history kept (the page's charts).
const HISTORY: usize = 120;
/// Window of the rate and the percentiles.
const WINDOW: u64 = 60;
/// Time-to-first-event samples kept per second (beyond that, a busy second is sampled).
const SAMPLES_PER_SECOND: usize = 2_000;

#[derive(Default)]
struct Bucket {
    second: u64,
    turns: u64,
    errors: u64,
    moves: u64,
    first_event_ms: Vec<f32>,
    router_overhead_ms: Vec<f32>,
}

#[derive(Default)]
struct Inner {
    buckets: VecDeque<Bucket>,
    outcomes: BTreeMap<&'static str, u64>,
    worker_errors: BTreeMap<&'static str, u64>,
    moves: u64,
    retries: u64,
    /// Turns routed to each worker that is not their key's home (its home is ejected).
    moved_to: BTreeMap<String, u64>,
}

#[derive(Default)]
pub struct EdgeStats {
    inner: Mutex<Inner>,
}

fn now_second() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

impl Inner {
    fn bucket(&mut self, second: u64) -> &mut Bucket {
        if self.buckets.back().is_none_or(|b| b.second < second) {
            self.buckets.push_back(Bucket { second, ..Bucket::default() });
            while self.buckets.len() > HISTORY {
                self.buckets.pop_front();
            }
        }
        // Clocks step back rarely; such a sample joins the newest bucket.
        self.buckets.back_mut().expect("pushed above")
    }
}

/// One second of history.
#[derive(Debug, Serialize, PartialEq)]
pub struct Point {
    pub t: u64,
    pub turns: u64,
    pub errors: u64,
    pub moves: u64,
    pub ttft_p50_ms: Option<f32>,
    pub ttft_p99_ms: Option<f32>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct Percentiles {
    pub p50: Option<f32>,
    pub p90: Option<f32>,
    pub p99: Option<f32>,
    pub samples: usize,
}

/// The statistics at one moment.
#[derive(Debug, Serialize)]
pub struct StatsSnapshot {
    /// Completed turns per second over the last minute.
    pub turn_rate: f64,
    pub ttft_ms: Percentiles,
    /// The router's share of the time to first token: the first output delta's time at the
    /// edge minus the engine's own queue and prefill time for that response.
    pub router_overhead_ms: Percentiles,
    pub turns_total: u64,
    /// Turns by outcome: ok, error (refused before a response existed), failed, cancelled.
    pub outcomes: BTreeMap<&'static str, u64>,
    /// Failed worker calls by class (unavailable, timeout, internal, ...).
    pub worker_errors: BTreeMap<&'static str, u64>,
    /// Turns served by a worker other than their key's home (it was ejected), and turns
    /// retried on another worker before any event.
    pub moves: u64,
    pub retries: u64,
    #[serde(skip)]
    pub moved_to: BTreeMap<String, u64>,
    pub series: Vec<Point>,
}

/// The `q` quantile of sorted `values`.
fn quantile(sorted: &[f32], q: f64) -> Option<f32> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

fn sorted(mut values: Vec<f32>) -> Vec<f32> {
    values.sort_by(f32::total_cmp);
    values
}

impl EdgeStats {
    /// A response's first event reached its client `elapsed` after the request.
    pub fn first_event(&self, elapsed: Duration) {
        let mut inner = self.inner.lock();
        let bucket = inner.bucket(now_second());
        if bucket.first_event_ms.len() < SAMPLES_PER_SECOND {
            bucket.first_event_ms.push(elapsed.as_secs_f32() * 1000.0);
        }
    }

    /// A streamed response's first token reached its client `overhead` later than the engine
    /// alone took to make it.
    pub fn router_overhead(&self, overhead: Duration) {
        let mut inner = self.inner.lock();
        let bucket = inner.bucket(now_second());
        if bucket.router_overhead_ms.len() < SAMPLES_PER_SECOND {
            bucket.router_overhead_ms.push(overhead.as_secs_f32() * 1000.0);
        }
    }

    /// A turn ended with `outcome` (`ok`, `error`, `failed`, `cancelled`).
    pub fn turn(&self, outcome: &'static str) {
        let mut inner = self.inner.lock();
        *inner.outcomes.entry(outcome).or_default() += 1;
        let bucket = inner.bucket(now_second());
        bucket.turns += 1;
        if outcome == "error" || outcome == "failed" {
            bucket.errors += 1;
        }
    }

    /// A worker call failed with `class`.
    pub fn worker_error(&self, class: &'static str) {
        *self.inner.lock().worker_errors.entry(class).or_default() += 1;
    }

    /// A turn went to `worker`, not its key's home: the home was ejected (`retry`: or it
    /// refused this very turn).
    pub fn moved(&self, worker: &str, retry: bool) {
        let mut inner = self.inner.lock();
        inner.moves += 1;
        inner.retries += u64::from(retry);
        *inner.moved_to.entry(worker.to_owned()).or_default() += 1;
        inner.bucket(now_second()).moves += 1;
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let now = now_second();
        let inner = self.inner.lock();
        let recent = inner.buckets.iter().filter(|b| b.second + WINDOW > now);
        let (turns, samples, overheads) = recent.fold((0, Vec::new(), Vec::new()), |(turns, mut s, mut o), b| {
            s.extend_from_slice(&b.first_event_ms);
            o.extend_from_slice(&b.router_overhead_ms);
            (turns + b.turns, s, o)
        });
        let percentiles = |values: Vec<f32>| {
            let values = sorted(values);
            Percentiles {
                p50: quantile(&values, 0.5),
                p90: quantile(&values, 0.9),
                p99: quantile(&values, 0.99),
                samples: values.len(),
            }
        };
        let series = inner
            .buckets
            .iter()
            .map(|b| {
                let values = sorted(b.first_event_ms.clone());
                Point {
                    t: b.second,
                    turns: b.turns,
                    errors: b.errors,
                    moves: b.moves,
                    ttft_p50_ms: quantile(&values, 0.5),
                    ttft_p99_ms: quantile(&values, 0.99),
                }
            })
            .collect();
        StatsSnapshot {
            turn_rate: turns as f64 / WINDOW as f64,
            ttft_ms: percentiles(samples),
            router_overhead_ms: percentiles(overheads),
            turns_total: inner.outcomes.values().sum(),
            outcomes: inner.outcomes.clone(),
            worker_errors: inner.worker_errors.clone(),
            moves: inner.moves,
            retries: inner.retries,
            moved_to: inner.moved_to.clone(),
            series,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_rate_and_moves_come_from_the_recorded_turns() {
        let stats = EdgeStats::default();
        for ms in 1..=100 {
            stats.first_event(Duration::from_millis(ms));
            stats.turn("ok");
        }
        stats.turn("failed");
        stats.worker_error("unavailable");
        stats.moved("worker-1", true);
        stats.moved("worker-1", false);
        let snapshot = stats.snapshot();
        assert_eq!(snapshot.turns_total, 101);
        assert_eq!(snapshot.outcomes["ok"], 100);
        assert_eq!(snapshot.outcomes["failed"], 1);
        assert_eq!(snapshot.worker_errors["unavailable"], 1);
        assert_eq!((snapshot.moves, snapshot.retries, snapshot.moved_to["worker-1"]), (2, 1, 2));
        let p50 = snapshot.ttft_ms.p50.unwrap();
        let p99 = snapshot.ttft_ms.p99.unwrap();
        assert!((49.0..=51.0).contains(&p50), "p50 {p50}");
        assert!((98.0..=100.0).contains(&p99), "p99 {p99}");
        assert!((snapshot.turn_rate - 101.0 / 60.0).abs() < 1e-9);
        let errors: u64 = snapshot.series.iter().map(|p| p.errors).sum();
        assert_eq!(errors, 1);
    }

    #[test]
    fn quantiles_of_nothing_are_none() {
        assert_eq!(quantile(&[], 0.5), None);
        assert_eq!(quantile(&[3.0], 0.99), Some(3.0));
    }
}
