//! Holding a node's membership for as long as it serves: register (retrying while the store
//! is unavailable), mark the node ready, and on a lost lease register again. Workers and shards
//! share this loop.
//!
//! A lease is lost in two ways that call for different answers. This node was cut off (frozen
//! by SIGSTOP or a VM pause past its TTL): the cluster moved its sessions meanwhile, so it is
//! fenced (not ready, no work) until registered again and its own view lists it. Or etcd itself
//! stalled past the TTL (frozen, overloaded) and revoked every lease at once when it resumed:
//! fencing then would fence every node of the cluster together, so a node that kept running
//! registers again at once and serves on, and is fenced only if that fails within
//! [`REREGISTER_GRACE`]. The node tells the two apart by watching its own clock: a timer that
//! fires [`PAUSE_LIMIT`] late means this process did not run.

use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::{Discovery, Member, NodeKind, Registration};
use crate::ops::Readiness;

/// How long a registered node waits to see itself in its own view before it serves anyway.
const OWN_VIEW_WAIT: Duration = Duration::from_secs(5);
/// A tick this late means the process was frozen.
const PAUSE_LIMIT: Duration = Duration::from_secs(1);
/// How often the pause watch ticks.
const PAUSE_TICK: Duration = Duration::from_millis(100);
/// How long a freeze counts against the node: longer than any lease TTL worth running with.
const PAUSE_MEMORY: Duration = Duration::from_secs(60);
/// A node that kept running while its lease was lost serves on for this long while it
/// registers again; past it, it is fenced.
pub const REREGISTER_GRACE: Duration = Duration::from_secs(2);

/// Registrations made again after a lost lease, by kind and whether the node was fenced.
pub const REREGISTRATIONS_TOTAL: &str = "tether_membership_reregistrations_total";

/// Remembers when this process last did not run for [`PAUSE_LIMIT`] or more.
struct PauseWatch {
    last_tick: Instant,
    paused_at: Option<Instant>,
}

impl PauseWatch {
    fn new() -> Self {
        PauseWatch { last_tick: Instant::now(), paused_at: None }
    }

    fn tick(&mut self) {
        let now = Instant::now();
        let gap = now - self.last_tick;
        if gap >= PAUSE_LIMIT {
            tracing::warn!(?gap, "this process did not run for a while (frozen?)");
            self.paused_at = Some(now);
        }
        self.last_tick = now;
    }

    fn paused_recently(&self) -> bool {
        self.paused_at.is_some_and(|at| at.elapsed() < PAUSE_MEMORY)
    }
}

/// Waits (bounded) until this process's view of `kind` lists `member`. The view is filled by a
/// listing that runs while the node registers; once it lists the node itself it is at least as
/// new as the registration, so a worker that then takes turns knows the peers it may have to
/// pull a moved chain from (before, a turn routed to it at once could find none).
async fn seen_in_own_view(discovery: &dyn Discovery, kind: NodeKind, member: &Member, shutdown: &CancellationToken) {
    if !discovery.lists_registrations() {
        return;
    }
    let mut members = discovery.watch(kind);
    let listed = members.wait_for(|members| members.contains_key(&member.id));
    tokio::select! {
        _ = shutdown.cancelled() => {}
        seen = tokio::time::timeout(OWN_VIEW_WAIT, listed) => if !matches!(seen, Ok(Ok(_))) {
            tracing::warn!(kind = kind.as_str(), node = %member.id, "own registration not seen in the membership view; serving anyway");
        },
    }
}

/// Registers `member`, retrying with backoff; `None` if `shutdown` came first.
pub async fn register_with_retry(
    discovery: &dyn Discovery,
    kind: NodeKind,
    member: &Member,
    shutdown: &CancellationToken,
) -> Option<Registration> {
    let mut backoff = Duration::from_millis(100);
    loop {
        match discovery.register(kind, member.clone()).await {
            Ok(registration) => return Some(registration),
            Err(error) => {
                tracing::warn!(kind = kind.as_str(), node = %member.id, %error, "registration failed; retrying")
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Keeps `member` registered until `shutdown`, setting `serving` while the lease holds and
/// calling `on_fenced` each time it is lost. Returns the live registration at shutdown (for
/// the caller to revoke when its drain allows), or `None` if it never registered.
pub async fn hold(
    discovery: &dyn Discovery,
    kind: NodeKind,
    member: &Member,
    serving: &Readiness,
    shutdown: &CancellationToken,
    on_fenced: impl Fn(),
) -> Option<Registration> {
    metrics::describe_counter!(
        REREGISTRATIONS_TOTAL,
        "Registrations made again after a lost lease, by whether the node was fenced meanwhile"
    );
    let mut registration = register_with_retry(discovery, kind, member, shutdown).await?;
    seen_in_own_view(discovery, kind, member, shutdown).await;
    serving.set(true);
    tracing::info!(kind = kind.as_str(), node = %member.id, addr = %member.addr, "serving");
    let mut pause = PauseWatch::new();
    let mut ticks = tokio::time::interval(PAUSE_TICK);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        let lost = registration.lost();
        tokio::select! {
            // First: after a freeze the late tick must be seen before the lost lease it caused.
            biased;
            _ = ticks.tick() => pause.tick(),
            _ = shutdown.cancelled() => return Some(registration),
            _ = lost.cancelled() => {
                pause.tick();
                if !pause.paused_recently() {
                    let again = register_with_retry(discovery, kind, member, shutdown);
                    if let Ok(again) = tokio::time::timeout(REREGISTER_GRACE, again).await {
                        registration = again?;
                        metrics::counter!(REREGISTRATIONS_TOTAL, "kind" => kind.as_str(), "fenced" => "false").increment(1);
                        tracing::warn!(kind = kind.as_str(), node = %member.id, "membership lease lost while this node ran (an etcd stall); registered again without fencing");
                        continue;
                    }
                }
                serving.set(false);
                on_fenced();
                tracing::warn!(kind = kind.as_str(), node = %member.id, "membership lease lost; fenced until registered again");
                registration = register_with_retry(discovery, kind, member, shutdown).await?;
                metrics::counter!(REREGISTRATIONS_TOTAL, "kind" => kind.as_str(), "fenced" => "true").increment(1);
                seen_in_own_view(discovery, kind, member, shutdown).await;
                serving.set(true);
                tracing::info!(kind = kind.as_str(), node = %member.id, "registered again; serving");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::sync::watch;
    use tokio_util::sync::CancellationToken;

    use super::hold;
    use crate::discovery::memory::MemoryDiscovery;
    use crate::discovery::{BoxFuture, Discovery, DiscoveryError, Member, Members, NodeKind, Registration};
    use crate::ops::Readiness;

    /// Registers in a real in-memory store, but this process's view is fed by the test: it
    /// stands for an etcd listing that has not arrived yet.
    struct LateView {
        store: MemoryDiscovery,
        view: watch::Sender<Members>,
    }

    impl Discovery for LateView {
        fn register(&self, kind: NodeKind, member: Member) -> BoxFuture<'_, Result<Registration, DiscoveryError>> {
            self.store.register(kind, member)
        }

        fn watch(&self, _kind: NodeKind) -> watch::Receiver<Members> {
            self.view.subscribe()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_serves_only_once_its_own_view_lists_it() {
        let discovery =
            Arc::new(LateView { store: MemoryDiscovery::new(), view: watch::channel(Members::default()).0 });
        let member = Member { id: "w1".into(), addr: "http://127.0.0.1:1".into() };
        let serving = Readiness::default();
        let shutdown = CancellationToken::new();
        let task = {
            let (discovery, member, serving, shutdown) =
                (discovery.clone(), member.clone(), serving.clone(), shutdown.clone());
            tokio::spawn(async move {
                hold(discovery.as_ref(), NodeKind::Worker, &member, &serving, &shutdown, || {}).await
            })
        };
        let mut stored = discovery.store.watch(NodeKind::Worker);
        stored.wait_for(|members| members.contains_key("w1")).await.unwrap();
        // Time is paused: this runs every task until all are blocked (1 s of virtual time,
        // less than the 5 s bound), it does not wait on the wall clock.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!serving.is_ready(), "registered, but its own view is still empty: not serving yet");

        discovery.view.send_replace(stored.borrow().clone());
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(serving.is_ready(), "its view lists it: serving");
        shutdown.cancel();
        assert!(task.await.unwrap().is_some());
    }
}
