//! The edge's view of the workers: a [`NodeSet`] of worker clients (persistent HTTP/2
//! channels) on the ring every edge computes identically, and bounded-load placement of new
//! sessions.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tether_common::SessionKey;
use tether_common::discovery::{Discovery, Members, NodeKind};
use tether_common::error_code::ErrorClass;
use tether_common::link::Link;
use tether_common::nodes::NodeSet;
use tether_common::tls::Tls;
use tether_proto::worker::v1::worker_client::WorkerClient;
use tether_proto::worker::v1::{ApiError, ListModelsRequest, ResponseBody, response_body};
use tokio_util::sync::CancellationToken;

/// How many workers a read-only call tries: the key's owner, then the next owners.
const READ_ATTEMPTS: usize = 3;

/// A worker as the edge calls it.
#[derive(Clone)]
pub struct WorkerHandle {
    pub id: Arc<str>,
    pub client: WorkerClient<Link>,
    /// Sessions this edge has live on the worker (WebSocket connections, HTTP turns).
    active: Arc<AtomicUsize>,
}

/// Keeps a session counted against its worker while alive.
pub struct ActiveSession(Arc<AtomicUsize>);

impl Drop for ActiveSession {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl WorkerHandle {
    pub fn track(&self) -> ActiveSession {
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveSession(self.active.clone())
    }

    /// Sessions this edge has live on the worker.
    pub fn load(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }
}

#[derive(Clone)]
pub struct WorkerPool {
    nodes: NodeSet<WorkerHandle>,
    load_factor: f64,
}

impl WorkerPool {
    /// Starts following worker membership until `stop`.
    /// Calls go over mutual TLS with `tls`.
    pub fn start(discovery: &dyn Discovery, load_factor: f64, tls: Option<Tls>, stop: CancellationToken) -> Self {
        let nodes = NodeSet::start(
            discovery,
            NodeKind::Worker,
            Arc::new(move |member: &tether_common::discovery::Member| {
                let client = WorkerClient::new(tether_common::link::connect(&member.addr, tls.as_ref())?)
                    .max_decoding_message_size(64 << 20)
                    .max_encoding_message_size(64 << 20);
                Some(WorkerHandle { id: Arc::from(member.id.as_str()), client, active: Arc::default() })
            }),
            Arc::new(|worker: WorkerHandle| {
                Box::pin(async move {
                    let mut client = worker.client.clone();
                    let call = client.list_models(ListModelsRequest {});
                    matches!(tokio::time::timeout(Duration::from_millis(500), call).await, Ok(Ok(_)))
                })
            }),
            Duration::from_millis(250),
            stop,
        );
        WorkerPool { nodes, load_factor }
    }

    /// Returns the owner of `key`.
    pub fn owner(&self, key: SessionKey) -> Option<WorkerHandle> {
        self.nodes.owner(key.0).map(|(_, handle)| handle)
    }

    /// Returns the worker that owns `key` when every member is up (ejected ones included):
    /// a turn served elsewhere has moved away from its home.
    pub fn home(&self, key: SessionKey) -> Option<std::sync::Arc<str>> {
        self.nodes.home(key.0)
    }

    /// Every member with this edge's handle and whether it is live (not ejected).
    pub fn handles(&self) -> Vec<(WorkerHandle, bool)> {
        self.nodes.all().into_iter().map(|(_, handle, live)| (handle, live)).collect()
    }

    /// Asks the owner of `key` a call that is safe to repeat (a retrieve, a listing, a token
    /// count, a delete): a worker that is gone or refuses (it drains) is ejected and the next
    /// owner asked, which pulls a moved chain. `None` when the worker had nothing to say.
    pub async fn ask<F, Fut>(&self, key: SessionKey, call: F) -> Result<Option<response_body::Kind>, ApiError>
    where
        F: Fn(WorkerClient<Link>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<ResponseBody>, tonic::Status>>,
    {
        let mut last = crate::error::unavailable(ErrorClass::Unavailable);
        for _ in 0..READ_ATTEMPTS {
            let Some(worker) = self.owner(key) else { break };
            match call(worker.client.clone()).await {
                Ok(reply) => return Ok(reply.into_inner().kind),
                Err(status) => {
                    let class = ErrorClass::from_status(&status);
                    last = crate::error::unavailable(class);
                    if !class.is_retryable() {
                        break;
                    }
                    self.eject(&worker);
                }
            }
        }
        Err(last)
    }

    /// Takes a worker that refused or broke a call out of this edge's ring.
    pub fn eject(&self, worker: &WorkerHandle) {
        self.nodes.eject(&worker.id);
    }

    /// Returns any live worker (for cluster-wide questions such as the model list).
    pub fn any(&self) -> Option<WorkerHandle> {
        self.nodes.live().into_iter().next().map(|(_, handle)| handle)
    }

    /// Places a new session: the first candidate key whose owner is under the load bound
    /// (`load_factor` × the average active sessions). `candidate(i)` yields the i-th key;
    /// after eight tries the first key is used whatever the load.
    pub fn place(&self, candidate: impl Fn(u32) -> SessionKey) -> SessionKey {
        let live = self.nodes.live();
        if live.len() <= 1 {
            return candidate(0);
        }
        let total: usize = live.iter().map(|(_, handle)| handle.load()).sum();
        let bound = (((total + 1) as f64 / live.len() as f64) * self.load_factor).ceil() as usize;
        for attempt in 0..8 {
            let key = candidate(attempt);
            match self.owner(key) {
                Some(owner) if owner.load() < bound.max(1) => return key,
                Some(_) => continue,
                None => break,
            }
        }
        candidate(0)
    }

    pub fn members(&self) -> Members {
        self.nodes.members()
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}
