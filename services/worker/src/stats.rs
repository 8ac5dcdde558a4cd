//! The worker's own counters for the operator view (`Status`): read on request, cheap to
//! keep. The Prometheus metrics say the same things, but their recorder is process-global
//! (`tether dev` runs three workers in one process), so each worker counts for itself here.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

#[derive(Default)]
pub struct WorkerStats {
    in_flight: AtomicU32,
    turns: AtomicU64,
    pulls: AtomicU64,
    handed_off: AtomicU64,
    replica_batches: AtomicU64,
    fenced: AtomicU64,
    draining: AtomicBool,
}

/// Counts one turn as in flight while alive.
pub struct InFlight<'a>(&'a WorkerStats);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A snapshot of the counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub in_flight: u32,
    pub turns: u64,
    pub pulls: u64,
    pub handed_off: u64,
    pub replica_batches: u64,
    pub fenced: u64,
    pub draining: bool,
}

impl WorkerStats {
    /// Counts a turn begun; it stays in flight until the guard drops.
    pub fn turn(&self) -> InFlight<'_> {
        self.turns.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self)
    }

    pub fn pulled(&self) {
        self.pulls.fetch_add(1, Ordering::Relaxed);
    }

    pub fn handed_off(&self, states: u64) {
        self.handed_off.fetch_add(states, Ordering::Relaxed);
    }

    pub fn replica_batch(&self) {
        self.replica_batches.fetch_add(1, Ordering::Relaxed);
    }

    pub fn fenced(&self) {
        self.fenced.fetch_add(1, Ordering::Relaxed);
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            in_flight: self.in_flight.load(Ordering::Relaxed),
            turns: self.turns.load(Ordering::Relaxed),
            pulls: self.pulls.load(Ordering::Relaxed),
            handed_off: self.handed_off.load(Ordering::Relaxed),
            replica_batches: self.replica_batches.load(Ordering::Relaxed),
            fenced: self.fenced.load(Ordering::Relaxed),
            draining: self.draining.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_turn_is_in_flight_until_its_guard_drops() {
        let stats = WorkerStats::default();
        let guard = stats.turn();
        stats.pulled();
        stats.handed_off(3);
        assert_eq!(
            stats.snapshot(),
            StatsSnapshot { in_flight: 1, turns: 1, pulls: 1, handed_off: 3, ..Default::default() }
        );
        drop(guard);
        assert_eq!(stats.snapshot().in_flight, 0);
        assert_eq!(stats.snapshot().turns, 1);
    }
}
