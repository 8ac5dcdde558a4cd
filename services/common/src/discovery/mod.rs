//! Membership: who the live workers and shards are.
//!
//! Services register themselves with a lease and watch the members of a kind. Two
//! implementations sit behind [`Discovery`]: [`memory::MemoryDiscovery`] for the single-process
//! cluster and the in-process tests, and etcd for real clusters.

#[cfg(feature = "etcd")]
pub mod etcd;
pub mod fixed;
pub mod membership;
pub mod memory;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The kinds of node that register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NodeKind {
    Worker,
    Shard,
}

impl NodeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeKind::Worker => "workers",
            NodeKind::Shard => "shards",
        }
    }
}

/// One registered node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub id: String,
    /// Base URL of its gRPC endpoint, e.g. `http://127.0.0.1:7001`.
    pub addr: String,
}

/// A snapshot of the members of one kind, by id.
pub type Members = Arc<BTreeMap<String, Member>>;

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("membership store unavailable: {0}")]
    Unavailable(String),
    #[error("member id {0} is already registered")]
    Duplicate(String),
}

/// A live registration. Dropping it does nothing; [`Registration::revoke`] deregisters at once.
pub struct Registration {
    lost: CancellationToken,
    revoke: Box<dyn FnOnce() -> BoxFuture<'static, ()> + Send>,
}

impl Registration {
    pub fn new(lost: CancellationToken, revoke: impl FnOnce() -> BoxFuture<'static, ()> + Send + 'static) -> Self {
        Registration { lost, revoke: Box::new(revoke) }
    }

    /// Cancelled when the lease is lost (the node must stop taking work).
    pub fn lost(&self) -> CancellationToken {
        self.lost.clone()
    }

    /// Deregisters now, so peers stop routing here without waiting for a lease to expire.
    pub async fn revoke(self) {
        (self.revoke)().await
    }
}

/// Registration and watching of members.
pub trait Discovery: Send + Sync + 'static {
    /// Registers `member` under `kind` with a lease kept alive until revoked or lost.
    fn register(&self, kind: NodeKind, member: Member) -> BoxFuture<'_, Result<Registration, DiscoveryError>>;

    /// Returns a receiver that always holds the latest known members of `kind`.
    fn watch(&self, kind: NodeKind) -> watch::Receiver<Members>;

    /// Whether a registration shows up in [`Discovery::watch`] (false for a fixed list).
    fn lists_registrations(&self) -> bool {
        true
    }
}
