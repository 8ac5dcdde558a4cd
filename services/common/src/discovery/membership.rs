//! Holding a node's membership for as long as it serves: register (retrying while the store
//! is unavailable), mark the node ready, and on a lost lease fence it (not ready, so it takes
//! no work) until it has registered again. Workers and shards share this loop.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Discovery, Member, NodeKind, Registration};
use crate::ops::Readiness;

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
                serving.set(true);
                tracing::info!(kind = kind.as_str(), node = %member.id, "registered again; serving");
            }
        }
    }
}
