//! Keeping completed `store=true` state alive across worker failure and membership change:
//! replication to the key's ring successor, pulls by a new owner, and hand-off on drain.
//! `store=false` state is never copied anywhere.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
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

/// States per hand-off `Replicate` call: bounds one message (a state may be large).
const HAND_OFF_BATCH: usize = 64;
/// Peers a draining worker sends to at once.
const HAND_OFF_PEERS: usize = 8;

/// Hands every stored state over to the worker that owns its key once this one is gone,
/// oldest first so parents arrive before their children. Bounded by the caller's deadline.
///
/// The states are grouped by receiving peer first, then each peer gets its states in
/// batches of [`HAND_OFF_BATCH`], [`HAND_OFF_PEERS`] peers at a time: the calls grow with the
/// states held, not with states × peers (grouping each 64 states by peer, as before, made
/// one call per state once a worker had about as many peers as states per chunk).
pub async fn hand_off(ctx: &WorkerContext) -> usize {
    let mut states = ctx.cache.stored_states();
    states.sort_by_key(|state| std::cmp::Reverse(state.created.elapsed()));
    let mut pending: Vec<&ResponseState> = states.iter().map(Arc::as_ref).collect();
    let mut moved = 0;
    for _attempt in 0..HOLDER_ATTEMPTS {
        let mut by_peer: HashMap<Arc<str>, (PeerClient, Vec<&ResponseState>)> = HashMap::new();
        for state in pending.drain(..) {
            if let Some((peer, client)) = ctx.peers.previous_owner(state.session.0) {
                by_peer.entry(peer).or_insert_with(|| (client, Vec::new())).1.push(state);
            }
        }
        if by_peer.is_empty() {
            break;
        }
        // Collected first: a lazy `map` over borrowed states here makes the worker's `serve()`
        // future not `Send` for every lifetime, which `tokio::spawn` (`tether dev`) needs.
        let mut sends = Vec::with_capacity(by_peer.len());
        for (peer, (client, states)) in by_peer {
            sends.push(hand_off_to(ctx, peer, client, states));
        }
        let results: Vec<HandOffResult<'_>> =
            futures_util::stream::iter(sends).buffer_unordered(HAND_OFF_PEERS).collect().await;
        for (peer, sent, unsent) in results {
            moved += sent;
            if !unsent.is_empty() {
                tracing::warn!(peer = %peer, states = unsent.len(), "hand-off refused; trying the next owner");
                ctx.peers.nodes.eject(&peer);
                pending.extend(unsent);
            }
        }
    }
    if !pending.is_empty() {
        tracing::warn!(states = pending.len(), "no owner took these states on hand-off");
    }
    moved
}

/// A peer, the states it took, and those it did not (from the first refused batch on).
type HandOffResult<'a> = (Arc<str>, usize, Vec<&'a ResponseState>);

/// Sends `states` to `peer` in order, batch by batch, until one is refused. A peer that
/// refuses (it drains too: two workers stopped at once would otherwise hand states to each
/// other and both leave) or fails gets the rest re-addressed to the owner after it. A chain's
/// states share one key, so a parent and its children always travel together, in order.
/// Each batch counts as handed off once stored, so a hand-off cut short by the deadline
/// still shows how far it got.
async fn hand_off_to<'a>(
    ctx: &WorkerContext,
    peer: Arc<str>,
    client: PeerClient,
    states: Vec<&'a ResponseState>,
) -> HandOffResult<'a> {
    let mut sent = 0;
    for batch in states.chunks(HAND_OFF_BATCH) {
        if let Err(error) = send_batch_retrying(client.clone(), batch, m::PATH_HAND_OFF).await {
            tracing::debug!(peer = %peer, ?error, "hand-off batch refused");
            return (peer, sent, states[sent..].to_vec());
        }
        sent += batch.len();
        metrics::counter!(m::HANDED_OFF).increment(batch.len() as u64);
        ctx.stats.handed_off(batch.len() as u64);
    }
    (peer, sent, Vec::new())
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
