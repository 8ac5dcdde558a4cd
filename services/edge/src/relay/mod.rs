//! Relaying one turn from a worker: start the worker's `Turn` stream and pass its already
//! serialized events through.
//!
//! If the worker goes away mid-response, the edge continues the response on the key's next
//! owner: it re-issues the turn with a `Resume` (the response's id and the completion tokens
//! the worker reported with the events relayed so far) and splices the new stream onto what
//! the client has (see [`splice`]). Only when no worker can continue it does the client get a
//! `response.failed` built from the `response.created` snapshot the edge kept, never a
//! truncated stream or a false `completed`.

mod splice;

use std::sync::Arc;

use serde_json::{Value, json};
use tether_common::{ErrorClass, SessionKey};
use tether_proto::worker::v1::{ApiError, Delivery, Resume, TurnEvent, TurnRequest, turn_event};
use tonic::Streaming;
use tracing::{Instrument, Span, field};

use crate::error::unavailable;
use crate::metrics as m;
use crate::state::EdgeState;
use crate::stats::EdgeStats;
use crate::workers::{ActiveSession, WorkerHandle};

use self::splice::{Ledger, Splice, Spliced};

/// How many workers a turn tries before it fails: the owner and, after ejecting it, the
/// next owners on the ring.
const ATTEMPTS: usize = 3;

/// Starts a turn on the owner of `key`. A worker that refuses the call or dies before the
/// turn produced any event is ejected from this edge's ring and the turn goes to the next
/// owner, transparently: nothing was committed and nothing reached the client.
pub async fn start_routed(state: &EdgeState, key: SessionKey, request: TurnRequest) -> Result<Relay, ApiError> {
    let mut last = unavailable(ErrorClass::Unavailable);
    crate::trace::record_session(key);
    for attempt in 0..ATTEMPTS {
        let placement = tracing::info_span!("edge.placement", attempt, worker = field::Empty);
        let Some(worker) = placement.in_scope(|| state.workers.owner(key)) else { break };
        placement.record("worker", &*worker.id);
        drop(placement);
        if attempt > 0 {
            metrics::counter!(m::TURN_RETRIES).increment(1);
        }
        if attempt > 0 || state.workers.home(key).is_some_and(|home| home != worker.id) {
            state.admission.stats().moved(&worker.id, attempt > 0);
        }
        // The relay span lives as long as the relay: the worker's turn is its child.
        let span = tracing::info_span!("edge.relay", otel.kind = "client", attempt, worker = %worker.id, events = field::Empty);
        let mut relay =
            match start(&worker, request.clone(), state.admission.stats(), span.clone()).instrument(span).await {
                Ok(relay) => relay,
                Err((error, retryable)) => {
                    last = error;
                    if retryable {
                        state.workers.eject(&worker);
                        continue;
                    }
                    return Err(last);
                }
            };
        match relay.next().await {
            Some(RelayItem::Error(error)) if relay.ledger.sent == 0 && relay.retryable_failure => {
                last = error;
                state.workers.eject(&worker);
            }
            Some(item) => {
                relay.pending = Some(item);
                if request.delivery == Delivery::Events as i32 {
                    relay.continuation = Some(Continuation { state: state.clone(), key, request, resumes: 0 });
                }
                return Ok(relay);
            }
            None => {
                state.workers.eject(&worker);
            }
        }
    }
    Err(last)
}

/// One item for the client.
#[derive(Debug)]
pub enum RelayItem {
    /// A serialized event; `terminal` marks the response's last one.
    Event {
        event_type: String,
        json: Vec<u8>,
        terminal: bool,
        /// On the terminal event: the engine's own time to first token, in microseconds.
        engine_ttft_us: u64,
    },
    /// A rejection before the response existed.
    Error(ApiError),
    /// The final Response object (non-streaming HTTP) and its HTTP status.
    Final { status: u16, json: Vec<u8> },
}

/// How many times one response may move to another worker mid-stream.
const RESUMES: u32 = 2;

/// What continuing a streamed response on another worker needs.
struct Continuation {
    state: EdgeState,
    key: SessionKey,
    request: TurnRequest,
    resumes: u32,
}

pub struct Relay {
    /// An item read ahead while deciding whether the worker was usable.
    pending: Option<RelayItem>,
    _active: Option<ActiveSession>,
    stream: Option<Streaming<TurnEvent>>,
    created: Option<Value>,
    /// What the client has been sent (`sent` events) and the tokens behind it.
    ledger: Ledger,
    /// Set while the stream is a continuation: drops what the client already has.
    splice: Option<Splice>,
    /// `None` for a final-only (non-streaming) turn, which is retried whole instead.
    continuation: Option<Continuation>,
    stream_id: Option<String>,
    worker: std::sync::Arc<str>,
    /// The stream broke before any event in a way another worker can retry.
    retryable_failure: bool,
    /// `edge.relay`, ended when the relay is dropped.
    span: Span,
    stats: Arc<EdgeStats>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.span.record("events", self.ledger.sent);
    }
}

/// Starts a turn on `worker`; a failure says whether another worker may take the turn.
async fn start(
    worker: &WorkerHandle,
    request: TurnRequest,
    stats: &Arc<EdgeStats>,
    span: Span,
) -> Result<Relay, (ApiError, bool)> {
    let stream_id = (!request.stream_id.is_empty()).then(|| request.stream_id.clone());
    match worker.client.clone().turn(tether_common::trace::request(request)).await {
        Ok(response) => Ok(Relay {
            pending: None,
            _active: Some(worker.track()),
            stream: Some(response.into_inner()),
            created: None,
            ledger: Ledger::default(),
            splice: None,
            continuation: None,
            stream_id,
            worker: worker.id.clone(),
            retryable_failure: false,
            stats: stats.clone(),
            span,
        }),
        Err(status) => {
            let class = ErrorClass::from_status(&status);
            tracing::warn!(worker = %worker.id, code = ?status.code(), "worker turn call failed");
            metrics::counter!(m::WORKER_ERRORS, "class" => class.as_label()).increment(1);
            stats.worker_error(class.as_label());
            Err((unavailable(class), class.is_retryable()))
        }
    }
}

impl Relay {
    /// Returns the next item, or `None` once the response has ended.
    pub async fn next(&mut self) -> Option<RelayItem> {
        if let Some(item) = self.pending.take() {
            return Some(item);
        }
        loop {
            let stream = self.stream.as_mut()?;
            let class = match stream.message().await {
                Ok(Some(TurnEvent { kind: Some(kind) })) => match self.item(kind) {
                    Some(item) => return Some(item),
                    None => continue,
                },
                Ok(Some(TurnEvent { kind: None })) => ErrorClass::Internal,
                // A stream that ends after events but before a terminal one is broken.
                Ok(None) if self.ledger.sent > 0 => ErrorClass::Unavailable,
                Ok(None) => {
                    self.stream = None;
                    return None;
                }
                Err(status) => {
                    let class = ErrorClass::from_status(&status);
                    tracing::warn!(worker = %self.worker, code = ?status.code(), sent = self.ledger.sent, "worker stream broke");
                    metrics::counter!(m::WORKER_ERRORS, "class" => class.as_label()).increment(1);
                    self.stats.worker_error(class.as_label());
                    class
                }
            };
            self.stream = None;
            if self.ledger.sent == 0 {
                self.retryable_failure = class.is_retryable();
                return Some(RelayItem::Error(unavailable(class)));
            }
            // After events, whatever broke the stream, another worker continues the response.
            if !self.resume().await {
                return self.failed_after_start();
            }
        }
    }

    /// Continues the response on the key's next owner after its worker went away; false
    /// when no worker took it.
    async fn resume(&mut self) -> bool {
        let (Some(continuation), Some(created)) = (self.continuation.as_mut(), self.created.as_ref()) else {
            return false;
        };
        let (Some(response_id), Some(created_at)) =
            (created.get("id").and_then(Value::as_str), created.get("created_at").and_then(Value::as_u64))
        else {
            return false;
        };
        let state = continuation.state.clone();
        if let Some(dead) = state.workers.handles().into_iter().find(|(handle, _)| handle.id == self.worker) {
            state.workers.eject(&dead.0);
        }
        while continuation.resumes < RESUMES {
            continuation.resumes += 1;
            let Some(worker) = state.workers.owner(continuation.key) else { break };
            let mut request = continuation.request.clone();
            request.resume = Some(Resume {
                response_id: response_id.to_owned(),
                created_at,
                completion_ids: self.ledger.ids.clone(),
                completion_text: self.ledger.text.clone(),
            });
            tracing::info!(from = %self.worker, to = %worker.id, tokens = self.ledger.ids.len(), sent = self.ledger.sent, "continuing the response on another worker");
            let span =
                tracing::info_span!(parent: &self.span, "edge.resume", otel.kind = "client", worker = %worker.id);
            match start(&worker, request, &self.stats, span.clone()).instrument(span).await {
                Ok(mut relay) => {
                    metrics::counter!(m::RESPONSES_RESUMED).increment(1);
                    self.stream = relay.stream.take();
                    self._active = relay._active.take();
                    self.worker = worker.id.clone();
                    self.splice = Some(Splice::default());
                    return true;
                }
                Err((_, retryable)) => {
                    if !retryable {
                        break;
                    }
                    state.workers.eject(&worker);
                }
            }
        }
        false
    }

    /// The item for the client of a worker's message; `None` when a continuation's event is
    /// one the client already has.
    fn item(&mut self, kind: turn_event::Kind) -> Option<RelayItem> {
        match kind {
            turn_event::Kind::Event(event) => {
                self.ledger.progress(&event.progress_ids, &event.progress_text);
                if self.ledger.sent == 0 && event.event_type == "response.created" {
                    self.created = serde_json::from_slice::<Value>(&event.json)
                        .ok()
                        .and_then(|mut v| v.get_mut("response").map(Value::take));
                }
                let (json, delta_bytes) = match self.splice.as_mut() {
                    None => (event.json, event.delta_bytes as usize),
                    Some(splice) => {
                        let spliced = splice.apply(
                            &self.ledger,
                            &event.event_type,
                            event.json,
                            event.delta_bytes as usize,
                            event.terminal,
                        );
                        match spliced {
                            Ok(Spliced::Drop) => return None,
                            Ok(Spliced::Forward { json, delta_bytes }) => (json, delta_bytes),
                            Err(error) => {
                                tracing::warn!(%error, worker = %self.worker, "continuation refused");
                                self.stream = None;
                                return self.failed_after_start();
                            }
                        }
                    }
                };
                self.ledger.relayed(&event.event_type, delta_bytes);
                if event.terminal {
                    self.stream = None;
                }
                Some(RelayItem::Event {
                    event_type: event.event_type,
                    json,
                    terminal: event.terminal,
                    engine_ttft_us: event.engine_ttft_us,
                })
            }
            turn_event::Kind::Error(error) if self.ledger.sent > 0 => {
                // A continuation refused before it started (the parent could not be resolved).
                tracing::warn!(worker = %self.worker, code = %error.code, "continuation refused");
                self.stream = None;
                self.failed_after_start()
            }
            turn_event::Kind::Error(error) => {
                self.stream = None;
                Some(RelayItem::Error(error))
            }
            turn_event::Kind::Final(response) => {
                self.stream = None;
                Some(RelayItem::Final { status: response.status as u16, json: response.json })
            }
        }
    }

    fn failed_after_start(&mut self) -> Option<RelayItem> {
        let mut response = self.created.take()?;
        response["status"] = json!("failed");
        response["output"] = json!([]);
        response["error"] =
            json!({"code": "server_error", "message": "The worker serving this response became unavailable."});
        let mut event = json!({"type": "response.failed", "sequence_number": self.ledger.sent});
        if let Some(stream_id) = &self.stream_id {
            event["stream_id"] = json!(stream_id);
        }
        event["response"] = response;
        self.ledger.relayed("response.failed", 0);
        metrics::counter!(m::RESPONSES_FAILED_MIDSTREAM).increment(1);
        Some(RelayItem::Event {
            event_type: "response.failed".into(),
            json: event.to_string().into_bytes(),
            terminal: true,
            engine_ttft_us: 0,
        })
    }
}
