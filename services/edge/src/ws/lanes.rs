//! Lanes (`stream_id`) of one connection: FIFO per lane, at most 16 responses in progress
//! across lanes (the rest queued, not rejected), at most 32 distinct named lanes over the
//! connection's life. The default lane (no `stream_id`) does not count toward the 32.
//! Queued requests are counted, with their sizes, so the connection can cap its queue
//! (`--ws-max-queued`, `--ws-max-queued-bytes`).

use std::collections::{HashMap, HashSet, VecDeque};

pub const MAX_ACTIVE: usize = 16;
pub const MAX_NAMED: usize = 32;

pub type LaneKey = Option<String>;

#[derive(Default)]
struct Lane<T> {
    busy: bool,
    /// Requests waiting, with their sizes in bytes.
    queue: VecDeque<(T, usize)>,
}

pub struct Lanes<T> {
    lanes: HashMap<LaneKey, Lane<T>>,
    named: HashSet<String>,
    active: usize,
    /// Lanes whose head waits for a free slot, in arrival order.
    ready: VecDeque<LaneKey>,
    queued: usize,
    queued_bytes: usize,
}

impl<T> Default for Lanes<T> {
    fn default() -> Self {
        Lanes {
            lanes: HashMap::new(),
            named: HashSet::new(),
            active: 0,
            ready: VecDeque::new(),
            queued: 0,
            queued_bytes: 0,
        }
    }
}

impl<T> Lanes<T> {
    /// Admits a named lane; false for a 33rd distinct name.
    pub fn admit(&mut self, lane: &LaneKey) -> bool {
        match lane {
            None => true,
            Some(name) if self.named.contains(name) => true,
            Some(_) if self.named.len() >= MAX_NAMED => false,
            Some(name) => self.named.insert(name.clone()),
        }
    }

    /// Whether a request pushed on `lane` now would wait rather than start at once.
    pub fn would_queue(&self, lane: &LaneKey) -> bool {
        self.active >= MAX_ACTIVE
            || !self.ready.is_empty()
            || self.lanes.get(lane).is_some_and(|entry| entry.busy || !entry.queue.is_empty())
    }

    /// Requests waiting (not started), and their total size in bytes.
    pub fn queued(&self) -> (usize, usize) {
        (self.queued, self.queued_bytes)
    }

    /// Queues a request of `bytes` bytes on its lane.
    pub fn push(&mut self, lane: LaneKey, request: T, bytes: usize) {
        let entry = self.lanes.entry(lane.clone()).or_insert_with(|| Lane { busy: false, queue: VecDeque::new() });
        let was_empty = entry.queue.is_empty();
        entry.queue.push_back((request, bytes));
        self.queued += 1;
        self.queued_bytes += bytes;
        if !entry.busy && was_empty {
            self.ready.push_back(lane);
        }
    }

    /// Returns the next request that may start now, marking its lane busy.
    pub fn next_startable(&mut self) -> Option<(LaneKey, T)> {
        if self.active >= MAX_ACTIVE {
            return None;
        }
        let lane = self.ready.pop_front()?;
        let entry = self.lanes.get_mut(&lane).expect("ready lanes exist");
        let (request, bytes) = entry.queue.pop_front().expect("ready lanes have a queued request");
        self.queued -= 1;
        self.queued_bytes -= bytes;
        entry.busy = true;
        self.active += 1;
        Some((lane, request))
    }

    /// Marks the lane's running request finished.
    pub fn finish(&mut self, lane: &LaneKey) {
        if let Some(entry) = self.lanes.get_mut(lane) {
            debug_assert!(entry.busy, "finish of an idle lane");
            entry.busy = false;
            self.active -= 1;
            if !entry.queue.is_empty() {
                self.ready.push_back(lane.clone());
            }
        }
    }

    /// No request running or queued.
    pub fn idle(&self) -> bool {
        self.active == 0 && self.ready.is_empty()
    }

    pub fn active(&self) -> usize {
        self.active
    }
}

#[cfg(test)]
mod tests {
    use super::{Lanes, MAX_ACTIVE, MAX_NAMED};

    #[test]
    fn fifo_per_lane_and_concurrent_across_lanes() {
        let mut lanes = Lanes::default();
        lanes.push(Some("a".into()), 1, 10);
        lanes.push(Some("a".into()), 2, 20);
        lanes.push(Some("b".into()), 3, 30);
        assert_eq!(lanes.queued(), (3, 60));
        assert_eq!(lanes.next_startable(), Some((Some("a".into()), 1)));
        assert_eq!(lanes.next_startable(), Some((Some("b".into()), 3)));
        assert_eq!(lanes.next_startable(), None, "lane a is busy");
        assert_eq!(lanes.queued(), (1, 20), "the second create of lane a waits");
        assert!(lanes.would_queue(&Some("a".into())) && lanes.would_queue(&Some("b".into())));
        assert!(!lanes.would_queue(&Some("c".into())), "a new lane starts at once");
        lanes.finish(&Some("a".into()));
        assert_eq!(lanes.next_startable(), Some((Some("a".into()), 2)));
        lanes.finish(&Some("a".into()));
        lanes.finish(&Some("b".into()));
        assert!(lanes.idle());
    }

    #[test]
    fn at_most_sixteen_active_the_rest_queue() {
        let mut lanes = Lanes::default();
        for i in 0..20 {
            lanes.push(Some(format!("l{i}")), i, 1);
        }
        let started: Vec<_> = std::iter::from_fn(|| lanes.next_startable()).collect();
        assert_eq!(started.len(), MAX_ACTIVE);
        assert_eq!(lanes.queued(), (4, 4));
        assert!(lanes.would_queue(&Some("new".into())), "all slots taken");
        lanes.finish(&Some("l0".into()));
        assert_eq!(lanes.next_startable().map(|(_, v)| v), Some(16));
        assert!(!lanes.idle());
    }

    #[test]
    fn named_lane_limit_counts_distinct_names() {
        let mut lanes: Lanes<()> = Lanes::default();
        for i in 0..MAX_NAMED {
            assert!(lanes.admit(&Some(format!("n{i}"))));
        }
        assert!(lanes.admit(&Some("n0".into())), "a known name is fine");
        assert!(lanes.admit(&None), "the default lane is not counted");
        assert!(!lanes.admit(&Some("n-new".into())));
    }
}
