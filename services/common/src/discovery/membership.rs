//! Holding a node's membership for as long as it serves: register (retrying while the store
//! is unavailable), mark the node ready, and on a lost lease fence it (not ready, so it takes
//! no work) until it has registered again. Workers and shards share this loop.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Discovery, Member, NodeKind, Registration};
use crate::ops::Readiness;

/// How long a registered node waits to see itself in its own view before it serves anyway.
const OWN_VIEW_WAIT: Duration = Duration::from_secs(5);

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
    let mut registration = register_with_retry(discovery, kind, member, shutdown).await?;
    seen_in_own_view(discovery, kind, member, shutdown).await;
    serving.set(true);
    tracing::info!(kind = kind.as_str(), node = %member.id, addr = %member.addr, "serving");
    loop {
        let lost = registration.lost();
        tokio::select! {
            _ = shutdown.cancelled() => return Some(registration),
            _ = lost.cancelled() => {
                serving.set(false);
                on_fenced();
                tracing::warn!(kind = kind.as_str(), node = %member.id, "membership lease lost; fenced until registered again");
                registration = register_with_retry(discovery, kind, member, shutdown).await?;
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
