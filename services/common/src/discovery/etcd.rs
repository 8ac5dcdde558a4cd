//! Membership in etcd: a lease per registration, a prefix watch per kind.
//!
//! Keys are `/tether/<cluster>/{workers,shards}/<id>` with the JSON value `{"id","addr"}`.
//! A registration is a lease kept alive every TTL/3 plus a create-only put under it (a txn on
//! `create_revision == 0`, so a live id is refused as [`DiscoveryError::Duplicate`]). Revoking
//! revokes the lease, so peers see the delete within milliseconds. A lease that etcd reports gone
//! (TTL 0: it expired, e.g. while this process was frozen) cancels `lost`, which fences the node.
//! An etcd that cannot be reached does not: the node keeps serving from the last membership, and
//! etcd refreshes lease TTLs when it comes back (a partition from a live etcd is noticed when the
//! partition heals; edges stop routing here as soon as the key is deleted).
//!
//! Each kind has one background watch task per [`EtcdDiscovery`], shared by every `watch()`
//! caller: list the prefix (recording the revision), then watch from the next revision; a broken,
//! cancelled or compacted watch lists again, with backoff. While etcd is unreachable the last known
//! members stay published, never cleared, and `tether_membership_stale_seconds` grows.
//!
//! A quiet prefix produces no watch traffic and a paused etcd keeps its TCP connection open, so
//! the watch asks for a progress notification every second and treats silence as a broken watch.
//!
//! An etcd that was frozen (SIGSTOP, a VM pause, a stall past the lease TTL) keeps its lease clocks
//! running and revokes every lease that expired meanwhile at once when it resumes: every member
//! disappears together, then registers again within a second (see `membership::hold`). So for
//! [`RESUME_GRACE`] after the watch hears from etcd again following a silence, a member that
//! disappears stays published; it goes only if it has not come back by then. A member that is
//! really gone is dropped [`RESUME_GRACE`] late; the edge's own failure detection (a refused or
//! broken call ejects the worker) covers that window.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::WatchOptions;
use etcd_client::{Client, Compare, CompareOp, ConnectOptions, Event, EventType, GetOptions, PutOptions, Txn, TxnOp};
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::time::{Instant, Interval, sleep, sleep_until, timeout};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::{BoxFuture, Discovery, DiscoveryError, Member, Members, NodeKind, Registration};

/// Seconds since a watch last heard from etcd (list, event or progress notification), by kind.
pub const STALE_SECONDS: &str = "tether_membership_stale_seconds";
/// Members that joined, changed address or left, as seen by a watch, by kind.
pub const CHANGES_TOTAL: &str = "tether_membership_changes_total";
/// Disappearances held back because they came with etcd's resumption, by kind.
pub const HELD_TOTAL: &str = "tether_membership_held_departures_total";

const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
const REVOKE_TIMEOUT: Duration = Duration::from_secs(1);
/// A watch requests progress this often, and is broken after `SILENCE_LIMIT` without a message.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
const SILENCE_LIMIT: Duration = Duration::from_secs(3);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// After etcd answers again following a silence, disappearances are held this long.
pub const RESUME_GRACE: Duration = Duration::from_secs(3);
/// A gap this long between two messages of a live watch counts as a silence.
const RESUME_GAP: Duration = Duration::from_secs(2);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("no etcd endpoints given")]
    NoEndpoints,
    #[error("invalid etcd endpoints: {0}")]
    Endpoints(#[source] etcd_client::Error),
}

/// Why a watch stopped and the prefix is listed again.
#[derive(Debug, thiserror::Error)]
enum WatchBroken {
    #[error("etcd request failed: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("nothing heard from etcd for {0:?}")]
    Silent(Duration),
    #[error("watch cancelled by etcd (compact revision {compact_revision}): {reason}")]
    Cancelled { compact_revision: i64, reason: String },
    #[error("watch stream ended")]
    Ended,
    #[error("response without a header")]
    NoHeader,
}

/// [`Discovery`] backed by etcd. Cloning shares the client and the watch tasks.
#[derive(Clone)]
pub struct EtcdDiscovery {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    /// `/tether/<cluster>/`.
    root: String,
    lease_ttl: Duration,
    watchers: Mutex<HashMap<NodeKind, Watcher>>,
    /// Ends the watch tasks once the last handle is dropped (registrations live on).
    stop: CancellationToken,
}

struct Watcher {
    members: watch::Receiver<Members>,
    heard: Arc<Mutex<Instant>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl EtcdDiscovery {
    /// Creates the client. Connecting is lazy: an unreachable etcd fails the first request, not this.
    pub async fn connect(endpoints: &[String], cluster: &str, lease_ttl: Duration) -> Result<Self, EtcdError> {
        if endpoints.is_empty() {
            return Err(EtcdError::NoEndpoints);
        }
        let options = ConnectOptions::new().with_connect_timeout(CONNECT_TIMEOUT).with_timeout(REQUEST_TIMEOUT);
        let client = Client::connect(endpoints, Some(options)).await.map_err(EtcdError::Endpoints)?;
        metrics::describe_gauge!(
            STALE_SECONDS,
            metrics::Unit::Seconds,
            "Seconds since the membership watch last heard from etcd"
        );
        metrics::describe_counter!(CHANGES_TOTAL, "Membership changes seen by the watch");
        metrics::describe_counter!(
            HELD_TOTAL,
            "Member departures held back because they came as etcd resumed after a silence"
        );
        let inner = Inner {
            client,
            root: format!("/tether/{cluster}/"),
            lease_ttl,
            watchers: Mutex::new(HashMap::new()),
            stop: CancellationToken::new(),
        };
        Ok(EtcdDiscovery { inner: Arc::new(inner) })
    }

    /// Returns how long ago the watch of `kind` last heard from etcd, if `kind` is watched.
    pub fn staleness(&self, kind: NodeKind) -> Option<Duration> {
        self.inner.watchers.lock().get(&kind).map(|watcher| watcher.heard.lock().elapsed())
    }

    fn prefix(&self, kind: NodeKind) -> String {
        format!("{}{}/", self.inner.root, kind.as_str())
    }

    async fn register_member(&self, kind: NodeKind, member: Member) -> Result<Registration, DiscoveryError> {
        let mut client = self.inner.client.clone();
        let key = format!("{}{}", self.prefix(kind), member.id);
        let value = serde_json::json!({ "id": member.id, "addr": member.addr }).to_string();
        // etcd grants at least its minimum TTL (2 s) and says so in the response.
        let ttl_seconds = (self.inner.lease_ttl.as_secs_f64().ceil() as i64).max(1);
        let grant = client.lease_grant(ttl_seconds, None).await.map_err(unavailable)?;
        let (lease, ttl) = (grant.id(), Duration::from_secs(grant.ttl().max(1).unsigned_abs()));
        let txn = Txn::new().when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)]).and_then([TxnOp::put(
            key.clone(),
            value,
            Some(PutOptions::new().with_lease(lease)),
        )]);
        match client.txn(txn).await {
            Ok(response) if response.succeeded() => {}
            Ok(_) => {
                revoke_lease(client, lease).await;
                return Err(DiscoveryError::Duplicate(member.id));
            }
            Err(error) => {
                revoke_lease(client, lease).await;
                return Err(unavailable(error));
            }
        }
        tracing::info!(key, lease, ttl_seconds = ttl.as_secs(), "registered in etcd");
        let (lost, stop) = (CancellationToken::new(), CancellationToken::new());
        // Armed before spawning, so even a task dropped before its first poll cancels `lost`.
        let guard = lost.clone().drop_guard();
        tokio::spawn(keep_alive(client.clone(), lease, ttl, guard, stop.clone(), key));
        Ok(Registration::new(lost, move || {
            Box::pin(async move {
                stop.cancel();
                revoke_lease(client, lease).await;
            })
        }))
    }
}

impl Discovery for EtcdDiscovery {
    fn register(&self, kind: NodeKind, member: Member) -> BoxFuture<'_, Result<Registration, DiscoveryError>> {
        Box::pin(self.register_member(kind, member))
    }

    /// Must be called inside a tokio runtime: the first call per kind spawns the watch task there.
    fn watch(&self, kind: NodeKind) -> watch::Receiver<Members> {
        let mut watchers = self.inner.watchers.lock();
        let previous = match watchers.get(&kind) {
            // A closed channel means the runtime that ran the task is gone: start another.
            Some(watcher) if watcher.members.has_changed().is_ok() => {
                let mut members = watcher.members.clone();
                members.mark_unchanged();
                return members;
            }
            Some(watcher) => watcher.members.borrow().clone(),
            None => Members::default(),
        };
        let (sender, members) = watch::channel(previous);
        let heard = Arc::new(Mutex::new(Instant::now()));
        let follower = Follower {
            client: self.inner.client.clone(),
            prefix: self.prefix(kind),
            kind,
            sender,
            heard: heard.clone(),
            listed_before: false,
            held: Held::default(),
        };
        let stop = self.inner.stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = follower.run() => {}
            }
        });
        watchers.insert(kind, Watcher { members: members.clone(), heard });
        members
    }
}

fn unavailable(error: etcd_client::Error) -> DiscoveryError {
    DiscoveryError::Unavailable(error.to_string())
}

async fn revoke_lease(mut client: Client, lease: i64) {
    match timeout(REVOKE_TIMEOUT, client.lease_revoke(lease)).await {
        Ok(Ok(_)) => tracing::debug!(lease, "lease revoked"),
        Ok(Err(etcd_client::Error::GRpcStatus(status))) if status.code() == tonic::Code::NotFound => {
            tracing::debug!(lease, "lease already gone")
        }
        Ok(Err(error)) => tracing::warn!(lease, %error, "lease revoke failed; it will expire"),
        Err(_) => tracing::warn!(lease, "lease revoke timed out; it will expire"),
    }
}

// === keep-alive ===

/// Renews `lease` until `stop`, then returns. Cancels `lost` when etcd reports the lease gone, and
/// when this task is dropped unfinished (its runtime shut down): nothing renews the lease then.
/// An unreachable etcd is not a lost lease (see `renew`).
async fn keep_alive(client: Client, lease: i64, ttl: Duration, lost: DropGuard, stop: CancellationToken, key: String) {
    let outcome = renew(client, lease, ttl, &stop, &key).await;
    let lost = lost.disarm();
    if let Some(reason) = outcome {
        tracing::warn!(key, lease, reason, "membership lease lost");
        lost.cancel();
    }
}

/// Renews `lease` every `ttl / 3`; returns `None` once `stop` is cancelled, else why it was lost.
async fn renew(
    mut client: Client,
    lease: i64,
    ttl: Duration,
    stop: &CancellationToken,
    key: &str,
) -> Option<&'static str> {
    let interval = ttl / 3;
    let mut last_ack = Instant::now(); // the grant just succeeded
    let mut backoff = BACKOFF_MIN.min(interval);
    // etcd could not be reached for a whole TTL. That is not a lost lease: an etcd outage
    // must not fence every node of the cluster, and etcd refreshes lease TTLs when it comes
    // back. Only etcd itself saying the lease is gone (TTL 0) fences this node.
    let mut unreachable = false;
    let reason = 'lease: loop {
        let opened = tokio::select! {
            _ = stop.cancelled() => return None,
            _ = sleep_until(last_ack + ttl), if !unreachable => {
                unreachable = true;
                tracing::warn!(key, lease, "lease not renewed for a whole ttl; serving on until etcd answers");
                continue;
            }
            // Bounded: opening waits for the first renewal, which a frozen etcd never sends.
            opened = timeout(REQUEST_TIMEOUT, client.lease_keep_alive(lease)) => opened,
        };
        let (mut keeper, mut responses) = match opened {
            Ok(Ok(stream)) => stream,
            Err(_) => {
                tracing::warn!(key, lease, "lease keep-alive unanswered; retrying");
                continue;
            }
            // Only raised when etcd answers the first renewal with TTL 0: expired or revoked.
            Ok(Err(etcd_client::Error::LeaseKeepAliveError(_))) => break 'lease "etcd reports the lease gone",
            Ok(Err(error)) => {
                tracing::warn!(key, lease, %error, ?backoff, "lease keep-alive failed; retrying");
                // Capped at the renewal interval, to renew as soon as etcd is back (it refreshes
                // lease TTLs on restart, so the lease survives an outage if renewed promptly).
                tokio::select! {
                    _ = stop.cancelled() => return None,
                    _ = sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(interval);
                continue;
            }
        };
        (last_ack, backoff, unreachable) = (Instant::now(), BACKOFF_MIN.min(interval), false);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return None,
                _ = sleep(interval) => {}
            }
            let renewal = async {
                keeper.keep_alive().await?;
                responses.message().await
            };
            let renewed = tokio::select! {
                _ = stop.cancelled() => return None,
                _ = sleep_until(last_ack + ttl), if !unreachable => {
                    unreachable = true;
                    tracing::warn!(key, lease, "lease not renewed for a whole ttl; serving on until etcd answers");
                    break;
                }
                renewed = renewal => renewed,
            };
            match renewed {
                Ok(Some(response)) if response.ttl() > 0 => (last_ack, unreachable) = (Instant::now(), false),
                Ok(Some(_)) => break 'lease "etcd reports the lease gone",
                Ok(None) => break,
                Err(error) => {
                    tracing::warn!(key, lease, %error, "lease keep-alive stream broke; reopening");
                    break;
                }
            }
        }
    };
    Some(reason)
}

// === watch ===

/// The watch task of one kind: publishes the members under `prefix` into `sender`.
struct Follower {
    client: Client,
    prefix: String,
    kind: NodeKind,
    sender: watch::Sender<Members>,
    /// When etcd last answered this watch: a listing, an event or a progress notification.
    heard: Arc<Mutex<Instant>>,
    /// Whether a listing succeeded before: a later one follows a broken watch.
    listed_before: bool,
    held: Held,
}

/// Departures that came while etcd was resuming: still published, dropped at their deadline
/// unless the member registered again first.
#[derive(Default)]
struct Held {
    /// Departures until this instant are held (the grace of the last resumption).
    until: Option<Instant>,
    /// Held members and when each is dropped.
    members: HashMap<String, Instant>,
}

impl Held {
    /// Opens a grace period: etcd answers again after a silence.
    fn resumed(&mut self, kind: NodeKind) {
        tracing::info!(kind = kind.as_str(), grace = ?RESUME_GRACE, "etcd answers again; holding departures");
        self.until = Some(Instant::now() + RESUME_GRACE);
    }

    /// Holds `id`'s departure if a grace period is open; `false` if it should go now.
    fn hold(&mut self, kind: NodeKind, id: &str) -> bool {
        let Some(until) = self.until.filter(|until| *until > Instant::now()) else { return false };
        if self.members.insert(id.to_owned(), until).is_none() {
            tracing::info!(
                kind = kind.as_str(),
                id,
                "member left as etcd resumed; held until it registers again or the grace ends"
            );
            metrics::counter!(HELD_TOTAL, "kind" => kind.as_str()).increment(1);
        }
        true
    }
}

impl Follower {
    /// Lists, watches, and on any break lists again with backoff, forever.
    async fn run(mut self) {
        let mut backoff = BACKOFF_MIN;
        let mut gauge = tokio::time::interval(PROBE_INTERVAL);
        let (kind, heard) = (self.kind, self.heard.clone());
        loop {
            let round = async {
                match self.list().await {
                    Ok(revision) => (true, self.watch_from(revision + 1).await),
                    Err(error) => (false, error),
                }
            };
            let (listed, error) = reporting_staleness(round, &mut gauge, kind, &heard).await;
            if listed {
                backoff = BACKOFF_MIN;
            }
            tracing::warn!(kind = kind.as_str(), %error, ?backoff, "membership watch broken; keeping the last known members");
            reporting_staleness(sleep(backoff), &mut gauge, kind, &heard).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Replaces the published members with a fresh listing; returns its revision. A listing
    /// after a broken watch is a resumption: members it lacks are held, not dropped.
    async fn list(&mut self) -> Result<i64, WatchBroken> {
        let request = self.client.get(self.prefix.as_str(), Some(GetOptions::new().with_prefix()));
        let response = timeout(REQUEST_TIMEOUT, request).await.map_err(|_| WatchBroken::Silent(REQUEST_TIMEOUT))??;
        let revision = response.header().ok_or(WatchBroken::NoHeader)?.revision();
        *self.heard.lock() = Instant::now();
        if std::mem::replace(&mut self.listed_before, true) {
            self.held.resumed(self.kind);
        }
        let mut listed: BTreeMap<String, Member> = response
            .kvs()
            .iter()
            .filter_map(|kv| parse_member(&self.prefix, kv.key(), kv.value()))
            .map(|member| (member.id.clone(), member))
            .collect();
        let (kind, held) = (self.kind, &mut self.held);
        let mut changes = 0;
        self.sender.send_if_modified(|members| {
            held.members.retain(|id, _| !listed.contains_key(id));
            for (id, member) in members.iter() {
                if !listed.contains_key(id) && held.hold(kind, id) {
                    listed.insert(id.clone(), member.clone());
                }
            }
            changes = listed.iter().filter(|(id, member)| members.get(*id) != Some(member)).count()
                + members.keys().filter(|id| !listed.contains_key(*id)).count();
            if changes > 0 {
                tracing::info!(kind = kind.as_str(), members = listed.len(), changes, "membership listed");
                *members = Arc::new(listed);
            }
            changes > 0
        });
        metrics::counter!(CHANGES_TOTAL, "kind" => self.kind.as_str()).increment(changes as u64);
        Ok(revision)
    }

    /// Applies watch events from revision `start` until the watch breaks; returns why.
    async fn watch_from(&mut self, start: i64) -> WatchBroken {
        let options = WatchOptions::new().with_prefix().with_start_revision(start).with_progress_notify();
        let stream = match timeout(REQUEST_TIMEOUT, self.client.watch(self.prefix.as_str(), Some(options))).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => return error.into(),
            Err(_) => return WatchBroken::Silent(REQUEST_TIMEOUT),
        };
        let (mut requests, mut responses) = stream.split();
        let mut probe = tokio::time::interval_at(Instant::now() + PROBE_INTERVAL, PROBE_INTERVAL);
        let mut last_heard = Instant::now();
        loop {
            tokio::select! {
                _ = probe.tick() => {
                    if last_heard.elapsed() > SILENCE_LIMIT {
                        return WatchBroken::Silent(SILENCE_LIMIT);
                    }
                    self.release_held();
                    if let Err(error) = requests.request_progress().await {
                        return error.into();
                    }
                }
                message = responses.message() => {
                    let response = match message {
                        Ok(Some(response)) => response,
                        Ok(None) => return WatchBroken::Ended,
                        Err(error) => return error.into(),
                    };
                    if response.canceled() {
                        let reason = response.cancel_reason().to_owned();
                        return WatchBroken::Cancelled { compact_revision: response.compact_revision(), reason };
                    }
                    if last_heard.elapsed() > RESUME_GAP {
                        self.held.resumed(self.kind);
                    }
                    last_heard = Instant::now();
                    *self.heard.lock() = last_heard;
                    self.apply(response.events());
                }
            }
        }
    }

    fn apply(&mut self, events: &[Event]) {
        let (kind, mut changes) = (self.kind, 0u64);
        let held = &mut self.held;
        self.sender.send_if_modified(|members| {
            for event in events {
                let Some(kv) = event.kv() else { continue };
                let Some(id) = kv.key().strip_prefix(self.prefix.as_bytes()) else { continue };
                let id = String::from_utf8_lossy(id);
                match event.event_type() {
                    EventType::Put => {
                        let Some(member) = parse_member(&self.prefix, kv.key(), kv.value()) else { continue };
                        held.members.remove(id.as_ref());
                        if members.get(id.as_ref()) != Some(&member) {
                            tracing::info!(kind = kind.as_str(), id = %id, addr = member.addr, "member joined");
                            Arc::make_mut(members).insert(member.id.clone(), member);
                            changes += 1;
                        }
                    }
                    EventType::Delete if members.contains_key(id.as_ref()) && !held.hold(kind, &id) => {
                        tracing::info!(kind = kind.as_str(), id = %id, "member left");
                        Arc::make_mut(members).remove(id.as_ref());
                        changes += 1;
                    }
                    EventType::Delete => {}
                }
            }
            changes > 0
        });
        metrics::counter!(CHANGES_TOTAL, "kind" => kind.as_str()).increment(changes);
    }

    /// Drops the held members whose grace ended without a new registration.
    fn release_held(&mut self) {
        let now = Instant::now();
        let (kind, held) = (self.kind, &mut self.held);
        if held.members.values().all(|deadline| *deadline > now) {
            return;
        }
        let mut changes = 0u64;
        self.sender.send_if_modified(|members| {
            held.members.retain(|id, deadline| {
                if *deadline > now {
                    return true;
                }
                if Arc::make_mut(members).remove(id).is_some() {
                    tracing::info!(kind = kind.as_str(), id = %id, "held member did not come back; left");
                    changes += 1;
                }
                false
            });
            changes > 0
        });
        metrics::counter!(CHANGES_TOTAL, "kind" => kind.as_str()).increment(changes);
    }
}

/// Runs `work` while refreshing the staleness gauge, even while a request hangs on a paused etcd.
async fn reporting_staleness<T>(
    work: impl Future<Output = T>,
    gauge: &mut Interval,
    kind: NodeKind,
    heard: &Mutex<Instant>,
) -> T {
    tokio::pin!(work);
    loop {
        tokio::select! {
            output = &mut work => return output,
            _ = gauge.tick() => {
                metrics::gauge!(STALE_SECONDS, "kind" => kind.as_str()).set(heard.lock().elapsed().as_secs_f64());
            }
        }
    }
}

/// Reads a member from its key (the id) and JSON value; logs and skips anything malformed.
fn parse_member(prefix: &str, key: &[u8], value: &[u8]) -> Option<Member> {
    #[derive(serde::Deserialize)]
    struct Entry {
        id: String,
        addr: String,
    }
    let id = std::str::from_utf8(key.strip_prefix(prefix.as_bytes())?).ok()?;
    match serde_json::from_slice::<Entry>(value) {
        Ok(entry) if entry.id == id && !id.is_empty() => Some(Member { id: entry.id, addr: entry.addr }),
        Ok(entry) => {
            tracing::warn!(key = id, value_id = entry.id, "member key and id disagree; skipped");
            None
        }
        Err(error) => {
            tracing::warn!(key = id, %error, "malformed member value; skipped");
            None
        }
    }
}
