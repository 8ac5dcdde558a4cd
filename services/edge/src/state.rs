//! The edge's shared state: configuration, authentication, the worker pool, admission and
//! the drain signal, behind one `Arc` that every handler, the relay and the WebSocket
//! connections share. It imports none of them, so the handlers and the router stand above it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::http::HeaderMap;
use rand::Rng;
use tether_common::SessionKey;
use tether_common::discovery::{Members, NodeKind};
use tether_common::ops::Readiness;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::admission::Admission;
use crate::auth::Auth;
use crate::config::EdgeConfig;
use crate::leading::LeadingHash;
use crate::status::ClusterView;
use crate::workers::WorkerPool;

pub struct EdgeInner {
    pub config: EdgeConfig,
    pub auth: Auth,
    pub workers: WorkerPool,
    pub shards: watch::Receiver<Members>,
    /// Turn, connection and request-rate admission, edge-wide and per tenant.
    pub admission: Admission,
    /// Cancelled when the edge drains: WebSockets close at their next idle moment.
    pub draining: CancellationToken,
    pub readiness: Readiness,
    /// The operator view's memory between requests.
    pub cluster: ClusterView,
    next_connection: AtomicU64,
}

#[derive(Clone)]
pub struct EdgeState(pub Arc<EdgeInner>);

impl std::ops::Deref for EdgeState {
    type Target = EdgeInner;

    fn deref(&self) -> &EdgeInner {
        &self.0
    }
}

impl EdgeState {
    pub fn new(
        config: EdgeConfig,
        workers: WorkerPool,
        shards: watch::Receiver<Members>,
        readiness: Readiness,
    ) -> Self {
        EdgeState(Arc::new(EdgeInner {
            auth: Auth::new(config.auth, &config.api_keys, config.admin_key.clone()),
            admission: Admission::new(&config),
            draining: CancellationToken::new(),
            readiness,
            cluster: ClusterView::new(config.tls.clone()),
            workers,
            shards,
            next_connection: AtomicU64::new(rand::rng().random::<u64>() | 1),
            config,
        }))
    }

    /// Returns a fresh, non-zero connection id.
    pub fn connection_id(&self) -> u64 {
        self.next_connection.fetch_add(2, Ordering::Relaxed)
    }

    /// Places a new session: keyed by the client's session header or cache key when given
    /// (so its turns share a worker and a shard cache; bounded load), else by the leading
    /// content of a stateless request (`store: false`), else at random (bounded load).
    ///
    /// A keyless request placed by its leading content is never re-salted: a client that
    /// resends its whole history must find the worker and shard holding its prefix, and a
    /// load bound would move it away from them under load, when caching matters most.
    pub fn place(
        &self,
        tenant: &str,
        headers: &HeaderMap,
        cache_key: Option<&str>,
        leading: Option<LeadingHash>,
    ) -> SessionKey {
        let client_key = cache_key.map(str::to_owned).or_else(|| session_header(headers));
        match (client_key, leading) {
            (Some(client_key), _) => self.workers.place(|salt| SessionKey::derive(tenant, &client_key, salt)),
            (None, Some(leading)) => SessionKey::of_content(tenant, leading.0),
            (None, None) => self.workers.place(|_| SessionKey::random()),
        }
    }

    pub fn members(&self, kind: NodeKind) -> Members {
        match kind {
            NodeKind::Worker => self.workers.members(),
            NodeKind::Shard => self.shards.borrow().clone(),
        }
    }
}

fn session_header(headers: &HeaderMap) -> Option<String> {
    ["session_id", "x-session-id"]
        .iter()
        .find_map(|name| headers.get(*name))
        .and_then(|value| value.to_str().ok())
        .filter(|value| !value.is_empty())
        .map(str::to_owned)
}

/// Returns a new request id (`req_` + 96 random bits).
pub fn request_id() -> String {
    tether_common::ids::item_id("req")
}
