//! Moving a session's KV cache between shards: an export is the bookkeeping's tokens plus the
//! engine's state for them; an import loads both on another shard of the same engine and
//! model. A draining shard hands every session it holds to the shard that owns it once this
//! one has left the ring, so the worker's next turn there claims its prefix and hits.
//!
//! A session changed by a turn between its export and its import (the drain lets in-flight
//! turns finish) arrives shorter than the worker believes: that turn misses and the worker
//! resends the full prompt, whose longest held prefix still counts as cached.

use std::time::Instant;

use futures_util::StreamExt;
use tether_proto::shard::v1::{ExportSessionResponse, ImportSessionRequest};

use crate::engine::Engine;
use crate::error::ShardError;
use crate::kv_cache::KvCache;
use crate::metrics as m;
use crate::peers::ShardPeers;

/// Returns `session`'s tokens and engine state; `None` when nothing exportable is held.
pub async fn export(
    engine: &dyn Engine,
    cache: &KvCache,
    session: u64,
) -> Result<Option<ExportSessionResponse>, ShardError> {
    let Some(tokens) = cache.export(session) else {
        return Ok(None);
    };
    let Some(state) = engine.export_session(session).await? else {
        return Ok(None);
    };
    // A shard serves one model (the sim's state does not depend on the model name).
    let model = engine.models().first().cloned().unwrap_or_default();
    Ok(Some(ExportSessionResponse { found: true, model, tokens, state }))
}

/// Loads an exported session; returns how many tokens the session now holds here.
pub async fn import(engine: &dyn Engine, cache: &KvCache, request: ImportSessionRequest) -> Result<u32, ShardError> {
    if !engine.models().contains(&request.model) {
        return Err(ShardError::IncompatibleState(format!("model {:?} is not served by this shard", request.model)));
    }
    // A session longer than this engine's window cannot be held here, whatever its state says.
    let window = engine.context_window() as usize;
    if request.tokens.len() > window {
        return Err(ShardError::IncompatibleState(format!(
            "{} tokens; this shard's context window is {window}",
            request.tokens.len()
        )));
    }
    let held = request.tokens.len() as u32;
    engine.import_session(request.session, request.tokens.clone(), request.state).await?;
    cache.import(request.session, request.tokens);
    metrics::counter!(m::SESSIONS_IMPORTED).increment(1);
    Ok(held)
}

/// Session hand-offs in flight at once. One at a time, a drain of thousands of sessions ran
/// past the shutdown grace (64 workers, 16 shards, 100,000 sessions: 5 s for ~6,000); 16 at a
/// time it took 2.8–4.9 s there.
const HAND_OFF_IN_FLIGHT: usize = 64;

/// What became of one session's hand-off.
enum HandOff {
    Moved,
    Kept,
    NoPeer,
    Deadline,
}

/// Hands every held session, most recently used first, to its owner on the ring without this
/// shard, [`HAND_OFF_IN_FLIGHT`] at a time. Stops at `deadline`; returns how many sessions moved.
pub async fn hand_off(engine: &dyn Engine, cache: &KvCache, peers: &ShardPeers, deadline: Instant) -> usize {
    let started = Instant::now();
    let sessions = cache.sessions();
    let mut outcomes = futures_util::stream::iter(sessions.iter().copied())
        .map(|session| hand_off_one(engine, cache, peers, session, deadline))
        .buffer_unordered(HAND_OFF_IN_FLIGHT);
    let mut moved = 0;
    while let Some(outcome) = outcomes.next().await {
        match outcome {
            HandOff::Moved => moved += 1,
            HandOff::Kept => {}
            HandOff::NoPeer => {
                tracing::info!(sessions = sessions.len(), "no other shard to hand sessions to");
                break;
            }
            HandOff::Deadline => {
                tracing::warn!(moved, held = sessions.len(), "shutdown deadline reached during the session hand-off");
                break;
            }
        }
    }
    metrics::counter!(m::SESSIONS_HANDED_OFF).increment(moved as u64);
    tracing::info!(
        moved,
        held = sessions.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "sessions handed off"
    );
    moved
}

async fn hand_off_one(
    engine: &dyn Engine,
    cache: &KvCache,
    peers: &ShardPeers,
    session: u64,
    deadline: Instant,
) -> HandOff {
    let Some((peer, mut client)) = peers.next_owner(session) else {
        return HandOff::NoPeer;
    };
    let exported = match export(engine, cache, session).await {
        Ok(Some(exported)) => exported,
        Ok(None) => return HandOff::Kept,
        Err(error) => {
            tracing::warn!(session = %format_args!("{session:016x}"), %error, "session export failed");
            return HandOff::Kept;
        }
    };
    let (tokens, bytes) = (exported.tokens.len(), exported.state.len());
    let request =
        ImportSessionRequest { session, model: exported.model, tokens: exported.tokens, state: exported.state };
    match tokio::time::timeout_at(deadline.into(), client.import_session(request)).await {
        Ok(Ok(reply)) if reply.get_ref().imported => {
            tracing::debug!(session = %format_args!("{session:016x}"), peer = %peer, tokens, bytes, "session handed off");
            HandOff::Moved
        }
        Ok(Ok(_)) => {
            tracing::warn!(session = %format_args!("{session:016x}"), peer = %peer, "session hand-off not imported");
            HandOff::Kept
        }
        Ok(Err(status)) => {
            tracing::warn!(session = %format_args!("{session:016x}"), peer = %peer, code = ?status.code(), "session hand-off refused");
            HandOff::Kept
        }
        Err(_) => HandOff::Deadline,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tether_proto::shard::v1::ImportSessionRequest;

    use crate::engine::sim::{SimConfig, SimEngine};
    use crate::error::ShardError;
    use crate::kv_cache::KvCache;

    #[tokio::test]
    async fn an_import_longer_than_the_window_is_refused() {
        let engine = SimEngine::new(SimConfig {
            models: vec!["tether-sim".into()],
            ttft_base: Duration::ZERO,
            prefill_per_token: Duration::ZERO,
            decode_interval: Duration::ZERO,
            slots: 1,
            output_tokens: 8,
            context_window: 16,
            structured_outputs: true,
        });
        let cache = KvCache::new(1_000);
        let request = |tokens: u32| ImportSessionRequest {
            session: 1,
            model: "tether-sim".into(),
            tokens: (0..tokens).collect(),
            state: Vec::new(),
        };
        let error = super::import(&engine, &cache, request(17)).await.unwrap_err();
        assert!(matches!(error, ShardError::IncompatibleState(_)), "{error:?}");
        assert_eq!(super::import(&engine, &cache, request(16)).await.unwrap(), 16);
    }
}
