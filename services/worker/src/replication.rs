//! Keeping completed `store=true` state alive across worker failure and membership change:
//! replication to the key's ring successor, pulls by a new owner, and hand-off on drain.
//! `store=false` state is never copied anywhere.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tether_common::ErrorClass;
use tether_proto::worker::v1::{FetchStateRequest, ReplicateRequest, ResponseRef, SessionState};

use crate::context::WorkerContext;
use crate::metrics as m;
use crate::peers::PeerClient;
use crate::session::ResponseState;
use crate::session::convert::{from_proto, to_proto};

const CALL_LIMIT: Duration = Duration::from_secs(2);

/// How many holders a state or a hand-off batch is offered to before it is left without a
/// copy: two workers drained at once are the first two a key's walk can meet.
const HOLDER_ATTEMPTS: usize = 4;

/// Copies `state` to its replica holder (a delta on the parent; whole if the replica lacks
/// the parent). A holder that is gone or refuses (it drains) is ejected and the next one tried.
#[tracing::instrument(name = "worker.replicate", skip_all, fields(store = state.store))]
pub async fn replicate(ctx: &WorkerContext, state: &ResponseState) {
    if !state.store {
        return;
    }
    let started = Instant::now();
    for attempt in 0..HOLDER_ATTEMPTS {
        let Some((peer, client)) = ctx.peers.replica_target(state.session.0) else {
            if attempt == 0 {
                return; // a single worker: nowhere to replicate
            }
            break;
        };
        match send_batch_retrying(client, &[state], m::PATH_REPLICATE).await {
            Ok(whole) => {
                metrics::counter!(m::REPLICATION_FULL).increment(whole as u64);
                metrics::histogram!(m::REPLICATION_SECONDS).record(started.elapsed().as_secs_f64());
                return;
            }
            Err(SendError::Status(status)) if !ErrorClass::from_status(&status).is_retryable() => {
                tracing::warn!(peer = %peer, code = ?status.code(), "replication refused");
                break;
            }
            Err(_) => ctx.peers.nodes.eject(&peer),
        }
    }
    tracing::warn!(response = %state.id, "replication failed: the stored response has no replica");
    metrics::counter!(m::REPLICATION_FAILURES).increment(1);
}

/// How many peers a pull asks: workers that joined at once stand before the key's earlier owner.
const PULL_CANDIDATES: usize = 4;

/// Pulls a response's state from the worker that held its key before this one (a chain
/// that moved here when membership changed). One extra round trip, then it is local.
#[tracing::instrument(name = "worker.pull", skip_all)]
pub async fn pull(ctx: &WorkerContext, tenant: &str, id: &str, key: u64) -> Option<Arc<ResponseState>> {
    let candidates = ctx.peers.holders(key, PULL_CANDIDATES);
    let mut asked = Vec::with_capacity(candidates.len());
    for (peer, mut client) in candidates {
        let request = FetchStateRequest { tenant: tenant.to_owned(), response_id: id.to_owned() };
        let state = match tokio::time::timeout(CALL_LIMIT, client.fetch_state(request)).await {
            Ok(Ok(reply)) => reply.into_inner().state,
            Ok(Err(status)) => {
                if ErrorClass::from_status(&status).is_retryable() {
                    ctx.peers.nodes.eject(&peer);
                }
                asked.push(format!("{peer}:{:?}", status.code()));
                continue;
            }
            Err(_) => {
                asked.push(format!("{peer}:timeout"));
                continue;
            }
        };
        match state {
            Some(state) => {
                tracing::debug!(peer = %peer, response = id, "pulled a moved chain");
                metrics::counter!(m::PULLED_BYTES).increment(prost::Message::encoded_len(&state) as u64);
                return adopt(ctx, tenant, state);
            }
            None => asked.push(format!("{peer}:absent")),
        }
    }
    // An unknown id, or a chain whose every copy sits outside the walk: the log says which.
    tracing::debug!(response = id, asked = ?asked, "no peer holds the state");
    None
}

/// Deletes the copies of a response held by the peers a [`pull`] would ask (the replica
/// holder, and the earlier owner of a chain that moved here), in parallel.
pub async fn forget(ctx: &WorkerContext, reference: &ResponseRef, key: u64) {
    let forward = ResponseRef { local_only: true, ..reference.clone() };
    let calls = ctx.peers.holders(key, PULL_CANDIDATES).into_iter().map(|(_, mut client)| {
        let forward = forward.clone();
        async move { tokio::time::timeout(CALL_LIMIT, client.delete_response(forward)).await }
    });
    futures_util::future::join_all(calls).await;
}

fn adopt(ctx: &WorkerContext, tenant: &str, state: SessionState) -> Option<Arc<ResponseState>> {
    let state = Arc::new(from_proto(state, None).ok()?);
    if *state.tenant != *tenant {
        return None;
    }
    ctx.cache.insert(state.clone());
    metrics::counter!(m::PULLS).increment(1);
    ctx.stats.pulled();
    Some(state)
}

/// Stores replicas sent by a peer, in order (a parent earlier in the batch serves a later
/// delta). Returns the ids of deltas whose parent is missing here.
pub fn accept(ctx: &WorkerContext, states: Vec<SessionState>) -> Vec<String> {
    let mut need_full = Vec::new();
    for state in states {
        let parent = if state.delta { ctx.cache.get(&state.tenant, &state.parent_id) } else { None };
        let id = state.id.clone();
        match from_proto(state, parent.as_deref()) {
            Ok(decoded) => ctx.cache.insert(Arc::new(decoded)),
            Err(crate::session::convert::ConvertError::MissingParent) => need_full.push(id),
            Err(error) => tracing::warn!(%error, "replica rejected"),
        }
    }
    metrics::counter!(m::REPLICAS_STORED).increment(1);
    ctx.stats.replica_batch();
    need_full
}

/// Hands every stored state over to the worker that owns its key once this one is gone,
/// oldest first so parents arrive before their children. Bounded by the caller's deadline.
pub async fn hand_off(ctx: &WorkerContext) -> usize {
    let mut states = ctx.cache.stored_states();
    states.sort_by_key(|state| std::cmp::Reverse(state.created.elapsed()));
    let mut moved = 0;
    for chunk in states.chunks(64) {
        moved += hand_off_chunk(ctx, chunk).await;
    }
    metrics::counter!(m::HANDED_OFF).increment(moved as u64);
    ctx.stats.handed_off(moved as u64);
    moved
}

/// Sends each state of `chunk` to its next owner. A peer that refuses (it drains too: two
/// workers stopped at once would otherwise hand states to each other and both leave) or fails
/// is ejected from this worker's ring, and its batch goes to the owner after it. A chain's
/// states share one key, so a parent and its children always travel together.
async fn hand_off_chunk(ctx: &WorkerContext, chunk: &[Arc<ResponseState>]) -> usize {
    let mut pending: Vec<&ResponseState> = chunk.iter().map(Arc::as_ref).collect();
    let mut moved = 0;
    for _attempt in 0..HOLDER_ATTEMPTS {
        let mut batches: HashMap<Arc<str>, (PeerClient, Vec<&ResponseState>)> = HashMap::new();
        for state in pending.drain(..) {
            if let Some((peer, client)) = ctx.peers.previous_owner(state.session.0) {
                batches.entry(peer).or_insert_with(|| (client, Vec::new())).1.push(state);
            }
        }
        if batches.is_empty() {
            break;
        }
        for (peer, (client, batch)) in batches {
            match send_batch_retrying(client, &batch, m::PATH_HAND_OFF).await {
                Ok(_) => moved += batch.len(),
                Err(error) => {
                    tracing::warn!(peer = %peer, states = batch.len(), ?error, "hand-off batch refused; trying the next owner");
                    ctx.peers.nodes.eject(&peer);
                    pending.extend(batch);
                }
            }
        }
    }
    if !pending.is_empty() {
        tracing::warn!(states = pending.len(), "no owner took these states on hand-off");
    }
    moved
}

/// Why a `Replicate` call did not store a batch.
#[derive(Debug)]
enum SendError {
    Status(tonic::Status),
    TimedOut,
}

/// [`send_batch`], and once more on the same peer if the connection broke or the call timed
/// out: a stale connection (the peer restarted) reconnects on the next call, and a call that
/// was in flight while this process was frozen (SIGSTOP, a long pause) times out the moment it
/// resumes. Neither is the peer's fault, and ejecting it would leave the state without a
/// replica. A peer that is really gone fails the second call too.
async fn send_batch_retrying(
    client: PeerClient,
    batch: &[&ResponseState],
    path: &'static str,
) -> Result<usize, SendError> {
    match send_batch(client.clone(), batch, path).await {
        Err(SendError::TimedOut) => send_batch(client, batch, path).await,
        Err(SendError::Status(status)) if ErrorClass::from_status(&status) == ErrorClass::Disconnected => {
            send_batch(client, batch, path).await
        }
        result => result,
    }
}

/// Replicates `batch` as deltas, then whole the states whose parent the peer lacks; returns
/// how many went whole. `path` labels the bytes sent (replication or hand-off).
async fn send_batch(client: PeerClient, batch: &[&ResponseState], path: &'static str) -> Result<usize, SendError> {
    let missing = send(client.clone(), batch.iter().map(|state| to_proto(state, true)).collect(), path).await?;
    let whole: Vec<SessionState> =
        batch.iter().filter(|state| missing.contains(&state.id)).map(|state| to_proto(state, false)).collect();
    let count = whole.len();
    if count > 0 {
        send(client, whole, path).await?;
    }
    Ok(count)
}

/// One `Replicate` call; returns the ids the peer needs whole.
async fn send(mut client: PeerClient, states: Vec<SessionState>, path: &'static str) -> Result<Vec<String>, SendError> {
    let request = ReplicateRequest { states };
    metrics::counter!(m::STATE_BYTES_SENT, "path" => path).increment(prost::Message::encoded_len(&request) as u64);
    match tokio::time::timeout(CALL_LIMIT, client.replicate(request)).await {
        Ok(Ok(reply)) => Ok(reply.into_inner().need_full),
        Ok(Err(status)) => Err(SendError::Status(status)),
        Err(_) => Err(SendError::TimedOut),
    }
}
