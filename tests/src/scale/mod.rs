//! A many-node run in one process: an in-process cluster of many workers and sim shards,
//! tens of thousands of `store=true` sessions over the edge's HTTP API (most idle, a fraction
//! active), then one membership change after another (a worker joins, a worker drains, a
//! worker is killed, a shard drains), each while the active sessions take turns.
//!
//! Per change it measures how many sessions changed owner on the ring the edge routes by
//! (consistent hashing promises about 1/N), whether the active sessions' turns went where
//! that ring says, the pulls, hand-offs and bytes they cost, the membership watch wake-ups,
//! how long the change took and every failed turn. Bounded: a fixed number of turns, each
//! with a timeout; the caller bounds the whole run in time.

pub mod measure;
pub mod report;
pub mod sessions;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tether_common::discovery::NodeKind;

use self::measure::{Counters, Held};
pub use self::report::{ChangeReport, RingCosts, ScaleReport};
use self::sessions::{Driver, Session};
use crate::client::WsClient;
use crate::cluster::{Cluster, Node};
use crate::wait;

/// The size of a run.
#[derive(Clone, Debug)]
pub struct ScaleConfig {
    pub workers: usize,
    pub shards: usize,
    pub sessions: usize,
    /// One session in `active_every` takes a turn around each change; the rest stay idle.
    pub active_every: usize,
    /// Turns in flight at once.
    pub concurrency: usize,
    /// Output tokens per turn (the sim answers at once: no time to first token, no decode wait).
    pub output_tokens: u32,
    /// Idle WebSocket connections opened to measure the edge's memory per connection (0: none).
    pub websockets: usize,
    /// Ring sizes whose build time is reported besides the run's own.
    pub ring_sizes: Vec<usize>,
}

impl ScaleConfig {
    /// The scaled-down run the test suite asserts on.
    pub fn small() -> Self {
        ScaleConfig {
            workers: 16,
            shards: 4,
            sessions: 10_000,
            active_every: 10,
            concurrency: 64,
            output_tokens: 4,
            websockets: 0,
            ring_sizes: Vec::new(),
        }
    }
}

/// The changes a run makes, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// A new worker registers.
    WorkerJoin,
    /// A worker shuts down gracefully (SIGTERM): deregisters, drains, hands its states off.
    WorkerDrain,
    /// A worker's runtime is dropped (SIGKILL) and its lease expires.
    WorkerKill,
    /// A shard shuts down gracefully.
    ShardDrain,
}

impl Change {
    pub const ALL: [Change; 4] = [Change::WorkerJoin, Change::WorkerDrain, Change::WorkerKill, Change::ShardDrain];

    pub fn name(self) -> &'static str {
        match self {
            Change::WorkerJoin => "worker joins",
            Change::WorkerDrain => "worker drains (SIGTERM)",
            Change::WorkerKill => "worker killed (SIGKILL)",
            Change::ShardDrain => "shard drains",
        }
    }

    fn kind(self) -> NodeKind {
        match self {
            Change::ShardDrain => NodeKind::Shard,
            _ => NodeKind::Worker,
        }
    }
}

/// Starts the cluster, creates the sessions, makes `changes` in order and measures each.
pub async fn run(config: &ScaleConfig, changes: &[Change]) -> ScaleReport {
    Counters::read(); // installs the process-wide recorder before any node records
    let rss_empty = measure::rss_bytes();
    let started = Instant::now();
    let mut cluster = start_cluster(config).await;
    let start_seconds = started.elapsed().as_secs_f64();
    let rss_cluster = measure::rss_bytes();
    tracing::info!(workers = config.workers, shards = config.shards, "--- cluster up; creating sessions");

    let driver = Driver::new(&cluster.url(), config.output_tokens);
    let created = Instant::now();
    let (mut sessions, create_failures) = driver.create(config.sessions, config.concurrency).await;
    let create_seconds = created.elapsed().as_secs_f64();
    let rss_sessions = measure::rss_bytes();
    let held = measure::held(&worker_urls(&cluster)).await.unwrap_or_default();
    let owners: Vec<String> = sessions.iter().map(|s| s.worker.to_string()).collect();

    let websocket_bytes = match config.websockets {
        0 => None,
        count => Some(websocket_memory(&cluster, count).await),
    };
    let active: Vec<usize> = (0..sessions.len()).step_by(config.active_every.max(1)).collect();
    let mut reports = Vec::new();
    for (at, change) in changes.iter().enumerate() {
        tracing::info!(change = change.name(), "--- change");
        reports.push(apply(&mut cluster, &driver, &mut sessions, &active, *change, at, config).await);
    }
    let mut ring_sizes = vec![config.workers];
    ring_sizes.extend(&config.ring_sizes);
    ScaleReport {
        config: config.clone(),
        start_seconds,
        sessions: sessions.len(),
        create_failures,
        create_seconds,
        rss_cluster: rss_cluster.saturating_sub(rss_empty),
        rss_per_session: rss_sessions.saturating_sub(rss_cluster) as f64 / sessions.len().max(1) as f64,
        held,
        spread: measure::spread(&owners),
        websocket_bytes,
        ring_build: ring_sizes
            .iter()
            .map(|&n| RingCosts {
                nodes: n,
                build: measure::ring_build(n),
                rebuild_on_join: measure::ring_rebuild_on_join(n),
                holders_lookup: measure::holders_lookup(n),
                bytes: measure::ring_memory(n),
            })
            .collect(),
        changes: reports,
    }
}

async fn start_cluster(config: &ScaleConfig) -> Cluster {
    let in_flight = (config.concurrency * 4).max(1_000);
    Cluster::builder()
        .workers(config.workers)
        .shards(config.shards)
        .edges(1)
        .shard_config(|shard| {
            // a fast cost model: the run measures the router, not a model
            shard.sim.ttft_base = Duration::ZERO;
            shard.sim.prefill_per_token = Duration::ZERO;
            shard.sim.decode_interval = Duration::ZERO;
            shard.sim.slots = 256;
        })
        .edge_config(|edge| {
            edge.max_in_flight = in_flight;
            edge.max_http_connections = in_flight;
            edge.max_connections = config.websockets + 1_000;
        })
        .start()
        .await
}

fn worker_urls(cluster: &Cluster) -> Vec<String> {
    cluster.workers.iter().filter(|node| node.kind.is_some()).map(Node::url).collect()
}

/// Opens `count` idle WebSocket connections and returns the process's memory growth per
/// connection (the edge's side and this client's side together: an upper bound for the edge).
async fn websocket_memory(cluster: &Cluster, count: usize) -> f64 {
    let before = measure::rss_bytes();
    let mut connections = Vec::with_capacity(count);
    for _ in 0..count {
        connections.push(WsClient::connect(&cluster.ws_url(), None).await.expect("a WebSocket connects"));
    }
    let after = measure::rss_bytes();
    drop(connections);
    after.saturating_sub(before) as f64 / count as f64
}

/// Makes `change` while the active sessions take one turn each, then has them take one more
/// (every moved session meets its new owner), and measures it.
async fn apply(
    cluster: &mut Cluster,
    driver: &Driver,
    sessions: &mut [Session],
    active: &[usize],
    change: Change,
    at: usize,
    config: &ScaleConfig,
) -> ChangeReport {
    let kind = change.kind();
    let keys: Vec<u64> = sessions.iter().map(|s| s.key).collect();
    let members_before: Vec<String> = cluster.discovery.members(kind).keys().cloned().collect();
    let owners_before = measure::owners(members_before.iter().map(String::as_str), &keys);
    let served_before: Vec<std::sync::Arc<str>> = sessions.iter().map(|s| s.worker.clone()).collect();
    let watchers = cluster.discovery.watchers(kind);
    // What the leaving worker holds: a drain should hand all of it off.
    let leaving_held = match change {
        Change::WorkerDrain | Change::WorkerKill => match cluster.workers.iter().find(|n| n.kind.is_some()) {
            Some(node) => measure::held(&[node.url()]).await,
            None => None,
        },
        _ => None,
    };
    let counters = Counters::read();

    let done = AtomicUsize::new(0);
    let during = driver.sweep(sessions, active, config.concurrency, &done);
    let make = async {
        // A quarter of the turns before the change, the rest while and after it happens.
        let quarter = active.len() / 4;
        wait::until(Duration::from_secs(120), "a quarter of the sweep", || {
            let ready = done.load(Ordering::Relaxed) >= quarter;
            async move { ready.then_some(()) }
        })
        .await;
        let started = Instant::now();
        let made = make_change(cluster, change, at).await;
        (made, started.elapsed())
    };
    let (failures_during, ((node, outcome), change_took)) = tokio::join!(during, make);
    let after_started = Instant::now();
    let failures_after = driver.sweep(sessions, active, config.concurrency, &AtomicUsize::new(0)).await;
    let sweep_after = after_started.elapsed();
    let counters = Counters::read().since(&counters);

    let members_after: Vec<String> = cluster.discovery.members(kind).keys().cloned().collect();
    let owners_after = measure::owners(members_after.iter().map(String::as_str), &keys);
    let moved: Vec<usize> = (0..keys.len()).filter(|&i| owners_before[i] != owners_after[i]).collect();
    // Consistent hashing: only the joiner gains keys, only the leaver loses them.
    let foreign_moves = moved
        .iter()
        .filter(|&&i| match change {
            Change::WorkerJoin => owners_after[i] != node,
            _ => owners_before[i] != node,
        })
        .count();
    let (mut active_moved, mut misrouted) = (0, 0);
    if kind == NodeKind::Worker {
        for &i in active {
            active_moved += usize::from(*served_before[i] != *sessions[i].worker);
            misrouted += usize::from(*sessions[i].worker != *owners_after[i]);
        }
    }
    let expected = match change {
        Change::WorkerJoin => 1.0 / members_after.len() as f64,
        _ => 1.0 / members_before.len() as f64,
    };
    ChangeReport {
        change,
        node,
        members_before: members_before.len(),
        members_after: members_after.len(),
        sessions: keys.len(),
        moved: moved.len(),
        expected_fraction: expected,
        foreign_moves,
        active: active.len(),
        active_moved,
        misrouted,
        failed_during: failures_during,
        failed_after: failures_after,
        counters,
        watchers,
        leaving_held,
        outcome,
        change_took,
        sweep_after,
    }
}

/// Makes one change; returns the id of the node that joined or left, and the error a
/// draining node exited with (e.g. its shutdown deadline passed).
async fn make_change(cluster: &mut Cluster, change: Change, at: usize) -> (String, Option<String>) {
    match change {
        Change::WorkerJoin => {
            let id = format!("worker-joined-{at}");
            cluster.add_worker(&id).await;
            (id, None)
        }
        Change::WorkerDrain | Change::WorkerKill => {
            let position = cluster.workers.iter().position(|n| n.kind.is_some()).expect("a worker to remove");
            let mut node = cluster.workers.remove(position);
            let id = node.id.clone();
            let discovery = cluster.discovery.clone();
            let kill = change == Change::WorkerKill;
            // Joining a node's thread blocks: off the runtime, so the sweep goes on meanwhile.
            let outcome = tokio::task::spawn_blocking(move || {
                if kill {
                    node.kill();
                    // The lease of a killed worker expires (etcd would after its TTL).
                    discovery.expire(NodeKind::Worker, &node.id);
                    Ok(())
                } else {
                    node.shutdown()
                }
            })
            .await
            .expect("the change ran");
            (id, outcome.err())
        }
        Change::ShardDrain => {
            let mut node = cluster.shards.remove(0);
            let id = node.id.clone();
            let outcome = tokio::task::spawn_blocking(move || node.shutdown()).await.expect("the change ran");
            (id, outcome.err())
        }
    }
}

/// Held session state per entry, in bytes.
pub fn bytes_per_entry(held: &Held) -> f64 {
    held.bytes as f64 / held.entries.max(1) as f64
}
