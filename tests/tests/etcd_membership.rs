//! Membership against a real etcd server (Debian's etcd-server, started per test by
//! `tether_tests::etcd::Etcd`): registration, watch, revoke, lease expiry after a crash, a lease
//! revoked behind the node's back, an unreachable etcd (paused or killed: members kept, nobody
//! fenced) and its return, and duplicate ids.
//!
//! Leases use etcd's minimum TTL (2 s), so expiry takes about 2.2-2.4 s (dependencies.md §3).

use std::time::{Duration, Instant};

use tether_common::discovery::etcd::EtcdDiscovery;
use tether_common::discovery::{Discovery, DiscoveryError, Member, Members, NodeKind};
use tether_tests::etcd::Etcd;
use tether_tests::wait::{until, within};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const TTL: Duration = Duration::from_secs(2);
const CLUSTER: &str = "test";

async fn connect(etcd: &Etcd) -> EtcdDiscovery {
    EtcdDiscovery::connect(&etcd.endpoints(), CLUSTER, TTL).await.expect("the etcd client is created lazily")
}

fn member(id: &str) -> Member {
    Member { id: id.into(), addr: format!("http://{id}.invalid:7000") }
}

fn ids(members: &watch::Receiver<Members>) -> Vec<String> {
    members.borrow().keys().cloned().collect()
}

/// Waits until the watched ids are exactly `expected`.
async fn until_ids(members: &watch::Receiver<Members>, expected: &[&str], limit: Duration) {
    until(limit, &format!("members {expected:?}"), || async { (ids(members) == expected).then_some(()) }).await;
}

/// Reads the series `name{kind=...}` from the process's recorder.
fn kind_metric(name: &str, kind: NodeKind) -> Option<f64> {
    let text = tether_common::telemetry::prometheus().render();
    let prefix = format!("{name}{{kind=\"{}\"}} ", kind.as_str());
    text.lines().find_map(|line| line.strip_prefix(&prefix)?.parse().ok())
}

/// Reads the gauge `tether_membership_stale_seconds{kind=...}`.
fn stale_gauge(kind: NodeKind) -> Option<f64> {
    kind_metric("tether_membership_stale_seconds", kind)
}

#[tokio::test]
async fn register_watch_and_revoke() {
    tether_common::telemetry::init_for_test();
    let _recorder = tether_common::telemetry::prometheus();
    let etcd = Etcd::start().await;
    let (node, peer) = (connect(&etcd).await, connect(&etcd).await);
    let workers = peer.watch(NodeKind::Worker);
    let shards = peer.watch(NodeKind::Shard);
    until(Duration::from_secs(5), "first listing", || async {
        (peer.staleness(NodeKind::Worker)? < Duration::from_millis(500)).then_some(())
    })
    .await;

    let registration = node.register(NodeKind::Worker, member("w1")).await.expect("register w1");
    until_ids(&workers, &["w1"], Duration::from_secs(2)).await;
    assert_eq!(workers.borrow()["w1"], member("w1"));
    assert!(shards.borrow().is_empty(), "a worker must not show up as a shard");
    // A second watcher shares the task and starts from the current members.
    assert_eq!(ids(&peer.watch(NodeKind::Worker)), ["w1"]);

    let started = Instant::now();
    registration.revoke().await;
    until_ids(&workers, &[], Duration::from_secs(2)).await;
    let seen = started.elapsed();
    assert!(seen < Duration::from_millis(500), "revoke took {seen:?} to reach a watcher");

    let text = tether_common::telemetry::prometheus().render();
    let changes = text.lines().find_map(|l| l.strip_prefix("tether_membership_changes_total{kind=\"workers\"} "));
    assert!(changes.and_then(|n| n.parse::<u64>().ok()).is_some_and(|n| n >= 2), "changes counter: {changes:?}");
}

#[tokio::test]
async fn a_second_registration_of_the_same_id_is_refused() {
    tether_common::telemetry::init_for_test();
    let etcd = Etcd::start().await;
    let (first, second) = (connect(&etcd).await, connect(&etcd).await);
    let registration = first.register(NodeKind::Shard, member("s1")).await.expect("register s1");
    let duplicate = second.register(NodeKind::Shard, member("s1")).await;
    assert!(matches!(&duplicate, Err(DiscoveryError::Duplicate(id)) if id == "s1"), "got {:?}", duplicate.err());
    // The same id under the other kind is a different key.
    let worker = second.register(NodeKind::Worker, member("s1")).await.expect("a worker may be called s1");

    let members = second.watch(NodeKind::Shard);
    until_ids(&members, &["s1"], Duration::from_secs(2)).await;
    assert!(!registration.lost().is_cancelled(), "the refused attempt must not disturb the holder");
    registration.revoke().await;
    let again = second.register(NodeKind::Shard, member("s1")).await.expect("free again after revoke");
    again.revoke().await;
    worker.revoke().await;
}

/// Registers from a runtime on its own thread; sending on the returned channel drops that
/// runtime mid-flight, as a crashed process would: nothing revokes the lease.
async fn register_on_own_runtime(etcd: &Etcd, id: &str) -> (CancellationToken, tokio::sync::oneshot::Sender<()>) {
    let (endpoints, member) = (etcd.endpoints(), member(id));
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let (crash_tx, crash_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
        runtime.block_on(async move {
            let discovery = EtcdDiscovery::connect(&endpoints, CLUSTER, TTL).await.expect("client");
            let registration = discovery.register(NodeKind::Worker, member).await.expect("register");
            let _ = ready_tx.send(registration.lost());
            let _ = crash_rx.await;
            drop(registration); // no revoke
        });
        drop(runtime); // drops the keep-alive task unfinished
    });
    let lost = within(Duration::from_secs(5), "registration on its own runtime", ready_rx).await.expect("registered");
    (lost, crash_tx)
}

#[tokio::test]
async fn a_crashed_node_disappears_after_the_ttl_and_its_lease_is_lost() {
    tether_common::telemetry::init_for_test();
    let etcd = Etcd::start().await;
    let peer = connect(&etcd).await;
    let workers = peer.watch(NodeKind::Worker);
    let (lost, crash) = register_on_own_runtime(&etcd, "w1").await;
    until_ids(&workers, &["w1"], Duration::from_secs(2)).await;

    let crashed = Instant::now();
    let _ = crash.send(());
    within(Duration::from_secs(2), "lost after the keep-alive task died", lost.cancelled()).await;
    until_ids(&workers, &[], TTL + Duration::from_secs(3)).await;
    let gone = crashed.elapsed();
    // Not a revoke (milliseconds): the lease ran out, about one TTL after its last renewal.
    assert!(gone > TTL / 2, "w1 vanished after {gone:?}, too soon for a lease expiry");
}

/// Asserts that `check` holds at every poll (10 ms apart) for the whole of `window`: for what must
/// *not* happen during an outage, which no amount of polling for a change can show.
async fn holds_for(window: Duration, what: &str, check: impl Fn() -> bool) {
    let end = tokio::time::Instant::now() + window;
    while tokio::time::Instant::now() < end {
        assert!(check(), "{what} stopped holding");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_paused_etcd_keeps_members_and_lease_then_expires_the_lease() {
    tether_common::telemetry::init_for_test();
    let _recorder = tether_common::telemetry::prometheus();
    let etcd = Etcd::start().await;
    let (node, peer) = (connect(&etcd).await, connect(&etcd).await);
    // Shards: this is the only test that watches them, so the shared gauge series is ours.
    let shards = peer.watch(NodeKind::Shard);
    let registration = node.register(NodeKind::Shard, member("s1")).await.expect("register s1");
    let lost = registration.lost();
    until_ids(&shards, &["s1"], Duration::from_secs(2)).await;

    etcd.pause();
    // An unreachable etcd fences nobody, and watchers keep the last known members.
    let kept = || ids(&shards) == ["s1"] && !lost.is_cancelled();
    holds_for(TTL + Duration::from_secs(1), "s1 listed and its lease held while etcd is paused", kept).await;
    // Past 3 s without an answer, the pause outlasted s1's last renewal by more than the TTL.
    until(Duration::from_secs(3), "staleness over 3 s", || async {
        (peer.staleness(NodeKind::Shard)? > Duration::from_secs(3)).then_some(())
    })
    .await;
    assert!(kept(), "s1 listed and its lease held while etcd is paused");
    let gauge = stale_gauge(NodeKind::Shard);
    assert!(gauge.is_some_and(|seconds| seconds > 2.0), "stale gauge: {gauge:?}");

    etcd.resume();
    until(Duration::from_secs(8), "fresh watch after resume", || async {
        (peer.staleness(NodeKind::Shard)? < Duration::from_secs(1)).then_some(())
    })
    .await;
    // A paused etcd keeps its lease clocks running (unlike a restart): s1's lease expired during
    // the pause, so etcd deletes it and answers the next renewal with TTL 0, which fences s1.
    // The watcher holds that departure for the grace that follows etcd's resumption (all leases
    // go at once then, and the nodes register again), then drops s1, which did not come back.
    until_ids(&shards, &[], Duration::from_secs(8)).await;
    let held = kind_metric("tether_membership_held_departures_total", NodeKind::Shard);
    assert_eq!(held, Some(1.0), "s1's departure was held");
    within(Duration::from_secs(4), "lost once etcd reports the lease gone", lost.cancelled()).await;
    registration.revoke().await;
}

#[tokio::test]
async fn a_restarted_etcd_resumes_the_watch_and_keeps_the_lease() {
    tether_common::telemetry::init_for_test();
    let mut etcd = Etcd::start().await;
    let (node, peer) = (connect(&etcd).await, connect(&etcd).await);
    let workers = peer.watch(NodeKind::Worker);
    let first = node.register(NodeKind::Worker, member("w1")).await.expect("register w1");
    let lost = first.lost();
    until_ids(&workers, &["w1"], Duration::from_secs(2)).await;

    etcd.kill();
    let kept = || ids(&workers) == ["w1"] && !lost.is_cancelled();
    holds_for(TTL + Duration::from_secs(1), "w1 listed and its lease held while etcd is down", kept).await;
    let stale = peer.staleness(NodeKind::Worker);
    assert!(stale.is_some_and(|s| s > TTL), "staleness while etcd is down: {stale:?}");

    etcd.restart().await;
    let second = until(Duration::from_secs(10), "register w2 after the restart", || async {
        node.register(NodeKind::Worker, member("w2")).await.ok()
    })
    .await;
    until_ids(&workers, &["w1", "w2"], Duration::from_secs(10)).await;
    // etcd restores w1's lease with a fresh TTL on restart and the keep-alive renews it in time:
    // w1 outlives that refreshed TTL (TTL + election timeout) without being fenced.
    let both = || ids(&workers) == ["w1", "w2"] && !lost.is_cancelled();
    holds_for(TTL + Duration::from_secs(2), "w1 and w2 listed, w1 not fenced, after the restart", both).await;
    second.revoke().await;
    first.revoke().await;
    until_ids(&workers, &[], Duration::from_secs(2)).await;
}

#[tokio::test]
async fn a_lease_revoked_behind_our_back_fires_lost_at_the_next_renewal() {
    tether_common::telemetry::init_for_test();
    let etcd = Etcd::start().await;
    let node = connect(&etcd).await;
    let registration = node.register(NodeKind::Worker, member("w1")).await.expect("register w1");
    // As an operator's `etcdctl lease revoke` would.
    let mut admin = etcd_client::Client::connect(etcd.endpoints(), None).await.expect("admin client");
    let listed = admin.get(format!("/tether/{CLUSTER}/workers/w1"), None).await.expect("get w1");
    let lease = listed.kvs().first().expect("w1 is registered").lease();
    admin.lease_revoke(lease).await.expect("revoke w1's lease");
    // etcd answers the next renewal (every TTL/3) with TTL 0; the TTL deadline is further away.
    let lost = registration.lost();
    within(Duration::from_millis(1200), "lost after the lease was revoked", lost.cancelled()).await;
    registration.revoke().await;
}
