//! The operator view of the cluster as this edge sees it, computed on request: every worker
//! (membership, this edge's ejections, and what the worker reports through `Status`), every
//! shard (`Info`), the edge's own turn statistics, and a log of state changes between
//! requests. `/v1/cluster/status`, `/dashboard` and `tether status` all show this snapshot.
//!
//! Worker states, most telling first: `draining` (it says so), `fenced` (up but not serving:
//! it lost its lease, or has not registered yet), `ejected` (this edge took it out of its ring after a refused or broken call),
//! `unreachable` (a member that did not answer `Status`), `live`, and `gone` (no longer a
//! member; shown for [`GONE_FOR`]). Shards are `live`, `unreachable` or `gone`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::future::join_all;
use parking_lot::Mutex;
use serde::Serialize;
use tether_common::discovery::{Member, NodeKind};
use tether_common::link::Link;
use tether_common::tls::Tls;
use tether_proto::shard::v1::InfoRequest;
use tether_proto::shard::v1::shard_client::ShardClient;
use tether_proto::worker::v1::StatusRequest;

use crate::state::EdgeState;
use crate::stats::StatsSnapshot;
use crate::workers::WorkerHandle;

/// How long a node that left membership stays on the view.
pub const GONE_FOR: Duration = Duration::from_secs(300);
/// A node that does not answer within this is `unreachable` (the view must stay fast).
const CALL_TIMEOUT: Duration = Duration::from_millis(400);
/// State changes kept.
const EVENTS: usize = 200;

#[derive(Debug, Serialize, Clone, PartialEq)]
pub struct WorkerView {
    pub id: String,
    pub addr: String,
    pub state: &'static str,
    /// Session states the worker holds (responses and connection-scoped state).
    pub sessions: Option<u64>,
    pub cache_bytes: Option<u64>,
    pub in_flight: Option<u32>,
    /// Sessions this edge has live on the worker now.
    pub edge_sessions: usize,
    pub turns: Option<u64>,
    pub pulls: Option<u64>,
    pub handed_off: Option<u64>,
    pub replica_batches: Option<u64>,
    pub fenced: Option<u64>,
    /// Turns this edge moved to the worker because their home was ejected.
    pub moved_in: u64,
}

#[derive(Debug, Serialize, Clone, PartialEq)]
pub struct ShardView {
    pub id: String,
    pub addr: String,
    pub state: &'static str,
    pub engine: Option<String>,
    pub models: Vec<String>,
    pub slots: Option<u32>,
    pub slots_busy: Option<u32>,
    pub cache_sessions: Option<u32>,
    pub cache_tokens: Option<u64>,
    pub cache_budget_tokens: Option<u64>,
    pub cache_hits: Option<u64>,
    pub cache_misses: Option<u64>,
}

#[derive(Debug, Serialize, Clone, PartialEq)]
pub struct Event {
    pub at_ms: u64,
    pub kind: &'static str,
    pub id: String,
    /// `None` for a node seen for the first time (a join).
    pub from: Option<&'static str>,
    pub to: &'static str,
}

#[derive(Debug, Serialize)]
pub struct CacheView {
    pub hits: u64,
    pub misses: u64,
    /// Hits over lookups since the shards started; `None` before any lookup.
    pub hit_rate: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct ClusterStatus {
    pub at_ms: u64,
    pub edge: StatsSnapshot,
    pub workers: Vec<WorkerView>,
    pub shards: Vec<ShardView>,
    pub cache: CacheView,
    pub events: Vec<Event>,
}

/// A node's row, as the change log and the `gone` rows need it.
trait NodeView: Clone {
    const KIND: &'static str;
    fn id(&self) -> &str;
    fn state(&self) -> &'static str;
    /// The row of a node that left membership: its last numbers, state `gone`.
    fn gone(&self) -> Self;
}

impl NodeView for WorkerView {
    const KIND: &'static str = "worker";
    fn id(&self) -> &str {
        &self.id
    }
    fn state(&self) -> &'static str {
        self.state
    }
    fn gone(&self) -> Self {
        WorkerView { state: "gone", edge_sessions: 0, in_flight: None, ..self.clone() }
    }
}

impl NodeView for ShardView {
    const KIND: &'static str = "shard";
    fn id(&self) -> &str {
        &self.id
    }
    fn state(&self) -> &'static str {
        self.state
    }
    fn gone(&self) -> Self {
        ShardView { state: "gone", slots_busy: None, ..self.clone() }
    }
}

/// The last rows of one kind of node, and those that left with when they left.
struct Tracker<V> {
    last: BTreeMap<String, V>,
    gone: BTreeMap<String, Instant>,
}

impl<V> Default for Tracker<V> {
    fn default() -> Self {
        Tracker { last: BTreeMap::new(), gone: BTreeMap::new() }
    }
}

impl<V: NodeView> Tracker<V> {
    /// Logs each node whose state changed since the last call into `events`, and appends
    /// the rows of nodes that left (until [`GONE_FOR`] has passed).
    fn track(&mut self, rows: &mut Vec<V>, events: &mut VecDeque<Event>, now: Instant, at_ms: u64) {
        let mut log = |id: &str, from: Option<&'static str>, to: &'static str| {
            events.push_back(Event { at_ms, kind: V::KIND, id: id.to_owned(), from, to });
            while events.len() > EVENTS {
                events.pop_front();
            }
        };
        for row in rows.iter() {
            let from = self.last.get(row.id()).map(NodeView::state);
            if from != Some(row.state()) {
                log(row.id(), from, row.state());
            }
            self.gone.remove(row.id());
        }
        let present: Vec<&str> = rows.iter().map(NodeView::id).collect();
        let left: Vec<String> = self.last.keys().filter(|id| !present.contains(&id.as_str())).cloned().collect();
        let mut kept = Vec::new();
        for id in left {
            let last = self.last[&id].clone();
            if last.state() != "gone" {
                log(&id, Some(last.state()), "gone");
                self.gone.insert(id.clone(), now);
            }
            if self.gone.get(&id).is_some_and(|left| now.duration_since(*left) < GONE_FOR) {
                kept.push(last.gone());
            } else {
                self.gone.remove(&id);
            }
        }
        self.last = rows.iter().chain(&kept).map(|row| (row.id().to_owned(), row.clone())).collect();
        rows.extend(kept);
    }
}

/// What the view remembers between requests: the last rows, the change log, and one shard
/// client per address.
pub struct ClusterView {
    tls: Option<Tls>,
    memory: Mutex<Memory>,
}

#[derive(Default)]
struct Memory {
    workers: Tracker<WorkerView>,
    shards: Tracker<ShardView>,
    events: VecDeque<Event>,
    shard_clients: HashMap<String, ShardClient<Link>>,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

impl ClusterView {
    pub fn new(tls: Option<Tls>) -> Self {
        ClusterView { tls, memory: Mutex::default() }
    }

    fn shard_client(&self, member: &Member) -> Option<ShardClient<Link>> {
        let mut memory = self.memory.lock();
        if let Some(client) = memory.shard_clients.get(&member.addr) {
            return Some(client.clone());
        }
        let client = ShardClient::new(tether_common::link::connect(&member.addr, self.tls.as_ref())?);
        memory.shard_clients.insert(member.addr.clone(), client.clone());
        Some(client)
    }

    /// Logs state changes since the last request and adds the rows of nodes that left.
    fn remember(&self, workers: &mut Vec<WorkerView>, shards: &mut Vec<ShardView>) -> Vec<Event> {
        let mut memory = self.memory.lock();
        let memory = &mut *memory;
        let (now, at_ms) = (Instant::now(), now_ms());
        memory.workers.track(workers, &mut memory.events, now, at_ms);
        memory.shards.track(shards, &mut memory.events, now, at_ms);
        let addrs: Vec<&str> = shards.iter().filter(|s| s.state != "gone").map(|s| s.addr.as_str()).collect();
        memory.shard_clients.retain(|addr, _| addrs.contains(&addr.as_str()));
        memory.events.iter().cloned().collect()
    }
}

async fn worker_view(handle: WorkerHandle, live: bool, addr: String, moved_in: u64) -> WorkerView {
    let mut client = handle.client.clone();
    let reply = tokio::time::timeout(CALL_TIMEOUT, client.status(StatusRequest {}))
        .await
        .ok()
        .and_then(Result::ok)
        .map(|r| r.into_inner());
    let state = match &reply {
        Some(status) if status.draining => "draining",
        Some(status) if !status.serving => "fenced",
        _ if !live => "ejected",
        None => "unreachable",
        Some(_) => "live",
    };
    WorkerView {
        id: handle.id.to_string(),
        addr,
        state,
        sessions: reply.as_ref().map(|r| r.cache_entries),
        cache_bytes: reply.as_ref().map(|r| r.cache_bytes),
        in_flight: reply.as_ref().map(|r| r.in_flight_turns),
        edge_sessions: handle.load(),
        turns: reply.as_ref().map(|r| r.turns),
        pulls: reply.as_ref().map(|r| r.pulls),
        handed_off: reply.as_ref().map(|r| r.handed_off),
        replica_batches: reply.as_ref().map(|r| r.replica_batches),
        fenced: reply.as_ref().map(|r| r.fenced),
        moved_in,
    }
}

async fn shard_view(client: Option<ShardClient<Link>>, member: Member) -> ShardView {
    let reply = match client {
        Some(mut client) => tokio::time::timeout(CALL_TIMEOUT, client.info(InfoRequest {}))
            .await
            .ok()
            .and_then(Result::ok)
            .map(|r| r.into_inner()),
        None => None,
    };
    ShardView {
        id: member.id,
        addr: member.addr,
        state: if reply.is_some() { "live" } else { "unreachable" },
        engine: reply.as_ref().map(|r| r.engine.clone()),
        models: reply.as_ref().map(|r| r.models.clone()).unwrap_or_default(),
        slots: reply.as_ref().map(|r| r.slots),
        slots_busy: reply.as_ref().map(|r| r.slots_busy),
        cache_sessions: reply.as_ref().map(|r| r.cache_sessions),
        cache_tokens: reply.as_ref().map(|r| r.cache_tokens),
        cache_budget_tokens: reply.as_ref().map(|r| r.cache_budget_tokens),
        cache_hits: reply.as_ref().map(|r| r.cache_hits),
        cache_misses: reply.as_ref().map(|r| r.cache_misses),
    }
}

/// The cluster as this edge sees it now.
pub async fn snapshot(state: &EdgeState) -> ClusterStatus {
    let edge = state.admission.stats().snapshot();
    let members = state.members(NodeKind::Worker);
    let workers = state.workers.handles().into_iter().map(|(handle, live)| {
        let addr = members.get(&*handle.id).map(|m| m.addr.clone()).unwrap_or_default();
        let moved_in = edge.moved_to.get(&*handle.id).copied().unwrap_or(0);
        worker_view(handle, live, addr, moved_in)
    });
    let shards = state
        .members(NodeKind::Shard)
        .values()
        .map(|member| shard_view(state.cluster.shard_client(member), member.clone()))
        .collect::<Vec<_>>();
    let (mut workers, mut shards) = tokio::join!(join_all(workers), join_all(shards));
    let events = state.cluster.remember(&mut workers, &mut shards);
    let live_shards = shards.iter().filter(|s| s.state == "live");
    let (hits, misses) =
        live_shards.fold((0, 0), |(h, m), s| (h + s.cache_hits.unwrap_or(0), m + s.cache_misses.unwrap_or(0)));
    let lookups = hits + misses;
    ClusterStatus {
        at_ms: now_ms(),
        edge,
        workers,
        shards,
        cache: CacheView { hits, misses, hit_rate: (lookups > 0).then(|| hits as f64 / lookups as f64) },
        events,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(id: &str, state: &'static str) -> ShardView {
        ShardView {
            id: id.into(),
            addr: format!("http://{id}"),
            state,
            engine: None,
            models: Vec::new(),
            slots: None,
            slots_busy: Some(1),
            cache_sessions: Some(3),
            cache_tokens: None,
            cache_budget_tokens: None,
            cache_hits: None,
            cache_misses: None,
        }
    }

    #[test]
    fn changes_are_logged_once_and_a_departed_node_stays_gone_for_a_while() {
        let mut tracker = Tracker::<ShardView>::default();
        let mut events = VecDeque::new();
        let start = Instant::now();
        let mut rows = vec![shard("a", "live"), shard("b", "live")];
        tracker.track(&mut rows, &mut events, start, 1);
        assert_eq!(events.len(), 2, "two joins: {events:?}");
        assert!(events.iter().all(|e| e.from.is_none() && e.to == "live"));

        let mut rows = vec![shard("a", "live"), shard("b", "unreachable")];
        tracker.track(&mut rows, &mut events, start, 2);
        assert_eq!(events.back().map(|e| (e.id.as_str(), e.from, e.to)), Some(("b", Some("live"), "unreachable")));

        let mut rows = vec![shard("a", "live")];
        tracker.track(&mut rows, &mut events, start, 3);
        assert_eq!(events.back().map(|e| (e.id.as_str(), e.to)), Some(("b", "gone")));
        assert_eq!(rows.len(), 2, "the departed shard stays on the view");
        assert_eq!((rows[1].state, rows[1].slots_busy, rows[1].cache_sessions), ("gone", None, Some(3)));

        let mut rows = vec![shard("a", "live")];
        tracker.track(&mut rows, &mut events, start + Duration::from_secs(1), 4);
        assert_eq!(events.len(), 4, "no new event while it stays gone");
        assert_eq!(rows.len(), 2);

        let mut rows = vec![shard("a", "live")];
        tracker.track(&mut rows, &mut events, start + GONE_FOR, 5);
        assert_eq!(rows.len(), 1, "dropped after GONE_FOR");
    }
}
