//! What a scale run reads off the cluster: the process-wide counters every node records into
//! (one Prometheus recorder per process), the workers' own `Status` (state held), the
//! process's resident memory, and ring build times.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tether_common::placement::{DEFAULT_VNODES, Ring};
use tether_proto::worker::v1::StatusRequest;
use tether_proto::worker::v1::worker_client::WorkerClient;

/// The counters a change is measured by, summed over every node of the process.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counters {
    pub pulls: f64,
    pub pulled_bytes: f64,
    pub handed_off: f64,
    pub hand_off_bytes: f64,
    pub replicate_bytes: f64,
    /// Membership snapshots applied by node sets (each is one watch wake-up and a ring rebuild).
    pub membership_applied: f64,
}

impl Counters {
    /// Reads the process-wide recorder (installed on first use).
    pub fn read() -> Self {
        let text = tether_common::telemetry::prometheus().render();
        let series = parse(&text);
        let sum = |name: &str, label: Option<&str>| -> f64 {
            series
                .iter()
                .filter(|(metric, labels, _)| metric == name && label.is_none_or(|label| labels.contains(label)))
                .map(|(_, _, value)| value)
                .sum()
        };
        Counters {
            pulls: sum("tether_worker_pulls_total", None),
            pulled_bytes: sum("tether_worker_pulled_bytes_total", None),
            handed_off: sum("tether_worker_handed_off_total", None),
            hand_off_bytes: sum("tether_worker_state_bytes_sent_total", Some("path=\"hand_off\"")),
            replicate_bytes: sum("tether_worker_state_bytes_sent_total", Some("path=\"replicate\"")),
            membership_applied: sum(tether_common::nodes::MEMBERSHIP_CHANGES, None),
        }
    }

    /// The increase since `before`.
    pub fn since(&self, before: &Counters) -> Counters {
        Counters {
            pulls: self.pulls - before.pulls,
            pulled_bytes: self.pulled_bytes - before.pulled_bytes,
            handed_off: self.handed_off - before.handed_off,
            hand_off_bytes: self.hand_off_bytes - before.hand_off_bytes,
            replicate_bytes: self.replicate_bytes - before.replicate_bytes,
            membership_applied: self.membership_applied - before.membership_applied,
        }
    }
}

/// `(name, labels, value)` of each sample line of the text exposition format.
fn parse(text: &str) -> Vec<(String, String, f64)> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let value: f64 = value.parse().ok()?;
            let (name, labels) = match series.split_once('{') {
                Some((name, labels)) => (name, labels.trim_end_matches('}')),
                None => (series, ""),
            };
            Some((name.to_owned(), labels.to_owned(), value))
        })
        .collect()
}

/// The session state the workers hold, from their `Status`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Held {
    pub entries: u64,
    pub bytes: u64,
}

/// Sums `Status` over the workers at `urls`; `None` if one does not answer.
pub async fn held(urls: &[String]) -> Option<Held> {
    let mut held = Held::default();
    for url in urls {
        let mut client = WorkerClient::connect(url.clone()).await.ok()?;
        let status = tokio::time::timeout(Duration::from_secs(5), client.status(StatusRequest {}))
            .await
            .ok()?
            .ok()?
            .into_inner();
        held.entries += status.cache_entries;
        held.bytes += status.cache_bytes;
    }
    Some(held)
}

/// The resident set size of this process in bytes (Linux `/proc/self/status`); 0 elsewhere.
pub fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// The median time to build a ring of `nodes` workers (what every node set does per change).
pub fn ring_build(nodes: usize) -> Duration {
    let ids: Vec<String> = (0..nodes).map(|i| format!("worker-{i}")).collect();
    let mut times: Vec<Duration> = (0..5)
        .map(|_| {
            let started = Instant::now();
            let ring = Ring::new(ids.iter().map(String::as_str), DEFAULT_VNODES);
            std::hint::black_box(&ring);
            started.elapsed()
        })
        .collect();
    times.sort();
    times[times.len() / 2]
}

/// The median time to rebuild a ring of `nodes` workers from the previous one when one joins
/// (what a node set does per membership change: only the newcomer's points are hashed).
pub fn ring_rebuild_on_join(nodes: usize) -> Duration {
    let mut ids: Vec<String> = (0..nodes).map(|i| format!("worker-{i}")).collect();
    let ring = Ring::new(ids.iter().map(String::as_str), DEFAULT_VNODES);
    ids.push("worker-joined".to_owned());
    let mut times: Vec<Duration> = (0..5)
        .map(|_| {
            let started = Instant::now();
            std::hint::black_box(ring.rebuilt(ids.iter().map(String::as_str)));
            started.elapsed()
        })
        .collect();
    times.sort();
    times[times.len() / 2]
}

/// The mean time to list the first four holders of a key on a ring of `nodes` workers (what
/// every pull and delete asks before its first call).
pub fn holders_lookup(nodes: usize) -> Duration {
    let ids: Vec<String> = (0..nodes).map(|i| format!("worker-{i}")).collect();
    let ring = Ring::new(ids.iter().map(String::as_str), DEFAULT_VNODES);
    let lookups = 200u64;
    let started = Instant::now();
    for key in 0..lookups {
        let key = key.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        std::hint::black_box(ring.walk(key).take(4).count());
    }
    started.elapsed() / lookups as u32
}

/// The bytes a ring of `nodes` holds once a successor was asked for keys of every owner (as a
/// worker's shard pool does: each turn asks its shard's successor). Until the ring was points
/// and a lazy walk, each owner asked built a copy of the ring without it (the run before
/// measured that as resident memory: 24 MiB at 64 nodes, 569 MiB at 256).
pub fn ring_memory(nodes: usize) -> u64 {
    let ids: Vec<String> = (0..nodes).map(|i| format!("worker-{i}")).collect();
    let ring = Ring::new(ids.iter().map(String::as_str), DEFAULT_VNODES);
    for key in 0..(nodes as u64 * 64) {
        std::hint::black_box(ring.successor(key.wrapping_mul(0x9e37_79b9_7f4a_7c15)));
    }
    ring.heap_bytes() as u64
}

/// Each session's owner on the ring of `workers` (what every edge computes).
pub fn owners<'a>(workers: impl IntoIterator<Item = &'a str>, keys: &[u64]) -> Vec<String> {
    let ring = Ring::new(workers, DEFAULT_VNODES);
    keys.iter().map(|key| ring.owner(*key).unwrap_or_default().to_owned()).collect()
}

/// How many sessions each owner holds, for the spread (max over mean).
pub fn spread(owners: &[String]) -> f64 {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for owner in owners {
        *counts.entry(owner).or_default() += 1;
    }
    let max = counts.values().copied().max().unwrap_or(0) as f64;
    let mean = owners.len() as f64 / counts.len().max(1) as f64;
    max / mean.max(1.0)
}
