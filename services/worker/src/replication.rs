//! Keeping completed `store=true` state alive across worker failure and membership change:
//! replication to the key's ring successor, pulls by a new owner, and hand-off on drain.
//! `store=false` state is never copied anywhere.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::ValueEnum;
use tether_common::ErrorClass;
use tether_proto::worker::v1::{FetchStateRequest, ReplicateRequest, SessionState};

use crate::metrics as m;
use crate::pipeline::WorkerContext;
use crate::session::ResponseState;
use crate::session::convert::{from_proto, to_proto};

/// When a completed response is copied to its replica.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum ReplicationMode {
    /// Before the terminal event: a client that saw `completed` can continue after a crash.
    #[default]
    Sync,
    /// After the terminal event, off the critical path.
    Async,
    Off,
}

const CALL_LIMIT: Duration = Duration::from_secs(2);

/// Copies `state` to its replica holder (a delta on the parent; whole if the replica lacks
/// the parent). A holder that refuses is ejected and the next one tried.
pub async fn replicate(ctx: &WorkerContext, state: &ResponseState) {
    if !state.store {
        return;
    }
    let started = Instant::now();
    for _attempt in 0..2 {
        let Some((peer, mut client)) = ctx.peers.replica_target(state.session.0) else { return };
        let delta = to_proto(state, true);
        let sent_delta = delta.delta;
        let result = tokio::time::timeout(CALL_LIMIT, client.replicate(ReplicateRequest { states: vec![delta] })).await;
        match result {
            Ok(Ok(reply)) => {
                if sent_delta && !reply.into_inner().need_full.is_empty() {
                    let whole = ReplicateRequest { states: vec![to_proto(state, false)] };
                    if tokio::time::timeout(CALL_LIMIT, client.replicate(whole)).await.is_err() {
                        break;
                    }
                    metrics::counter!(m::REPLICATION_FULL).increment(1);
                }
                metrics::histogram!(m::REPLICATION_SECONDS).record(started.elapsed().as_secs_f64());
                return;
            }
            Ok(Err(status)) if ErrorClass::from_status(&status).is_retryable() => ctx.peers.nodes.eject(&peer),
            Ok(Err(status)) => {
                tracing::warn!(peer = %peer, code = ?status.code(), "replication refused");
                break;
            }
            Err(_) => ctx.peers.nodes.eject(&peer),
        }
    }
    metrics::counter!(m::REPLICATION_FAILURES).increment(1);
}

/// Pulls a response's state from the worker that held its key before this one (a chain
/// that moved here when membership changed). One extra round trip, then it is local.
pub async fn pull(ctx: &WorkerContext, tenant: &str, id: &str, key: u64) -> Option<Arc<ResponseState>> {
    // The previous owner (a new node took its keys, or it is draining), else the key's
    // replica holder as this worker sees it.
    let mut candidates = Vec::new();
    for candidate in [ctx.peers.previous_owner(key), ctx.peers.replica_target(key)].into_iter().flatten() {
        if !candidates.iter().any(|(peer, _): &(Arc<str>, _)| *peer == candidate.0) {
            candidates.push(candidate);
        }
    }
    for (peer, mut client) in candidates {
        let request = FetchStateRequest { tenant: tenant.to_owned(), response_id: id.to_owned() };
        let state = match tokio::time::timeout(CALL_LIMIT, client.fetch_state(request)).await {
            Ok(Ok(reply)) => reply.into_inner().state,
            Ok(Err(status)) => {
                if ErrorClass::from_status(&status).is_retryable() {
                    ctx.peers.nodes.eject(&peer);
                }
                None
            }
            Err(_) => None,
        };
        if let Some(state) = state {
            tracing::debug!(peer = %peer, "pulled a moved chain");
            return adopt(ctx, tenant, state);
        }
    }
    None
}

fn adopt(ctx: &WorkerContext, tenant: &str, state: SessionState) -> Option<Arc<ResponseState>> {
    let state = Arc::new(from_proto(state, None).ok()?);
    if *state.tenant != *tenant {
        return None;
    }
    ctx.cache.insert(state.clone());
    metrics::counter!(m::PULLS).increment(1);
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
    need_full
}

/// Hands every stored state over to the worker that owns its key once this one is gone,
/// oldest first so parents arrive before their children. Bounded by the caller's deadline.
pub async fn hand_off(ctx: &WorkerContext) -> usize {
    let mut states = ctx.cache.stored_states();
    states.sort_by_key(|state| std::cmp::Reverse(state.created.elapsed()));
    let mut moved = 0;
    for chunk in states.chunks(64) {
        let mut batches: std::collections::HashMap<Arc<str>, (crate::peers::PeerClient, Vec<&Arc<ResponseState>>)> =
            std::collections::HashMap::new();
        for state in chunk {
            if let Some((peer, client)) = ctx.peers.previous_owner(state.session.0) {
                batches.entry(peer).or_insert_with(|| (client, Vec::new())).1.push(state);
            }
        }
        for (peer, (mut client, batch)) in batches {
            let request = ReplicateRequest { states: batch.iter().map(|state| to_proto(state, true)).collect() };
            match tokio::time::timeout(CALL_LIMIT, client.replicate(request)).await {
                Ok(Ok(reply)) => {
                    let missing = reply.into_inner().need_full;
                    let whole: Vec<SessionState> =
                        batch.iter().filter(|s| missing.contains(&s.id)).map(|s| to_proto(s, false)).collect();
                    if !whole.is_empty() {
                        let _ = tokio::time::timeout(CALL_LIMIT, client.replicate(ReplicateRequest { states: whole }))
                            .await;
                    }
                    moved += batch.len();
                }
                _ => tracing::warn!(peer = %peer, "hand-off batch failed"),
            }
        }
    }
    metrics::counter!(m::HANDED_OFF).increment(moved as u64);
    moved
}
