//! Relaying one turn from a worker: start the worker's `Turn` stream and pass its already
//! serialized events through. If the worker goes away mid-response, the client still gets
//! exactly one terminal event: a `response.failed` built from the `response.created`
//! snapshot the edge kept, never a truncated stream or a false `completed`.

use std::sync::Arc;

use serde_json::{Value, json};
use tether_common::{ErrorClass, SessionKey};
use tether_proto::worker::v1::{ApiError, TurnEvent, TurnRequest, turn_event};
use tonic::Streaming;
use tracing::{Instrument, Span, field};

use crate::error::unavailable;
use crate::metrics as m;
use crate::state::EdgeState;
use crate::stats::EdgeStats;
use crate::workers::{ActiveSession, WorkerHandle};

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
            Some(RelayItem::Error(error)) if relay.sent == 0 && relay.retryable_failure => {
                last = error;
                state.workers.eject(&worker);
            }
            Some(item) => {
                relay.pending = Some(item);
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

pub struct Relay {
    /// An item read ahead while deciding whether the worker was usable.
    pending: Option<RelayItem>,
    _active: Option<ActiveSession>,
    stream: Option<Streaming<TurnEvent>>,
    created: Option<Value>,
    sent: u64,
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
        self.span.record("events", self.sent);
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
            sent: 0,
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
        let stream = self.stream.as_mut()?;
        match stream.message().await {
            Ok(Some(TurnEvent { kind: Some(kind) })) => Some(self.item(kind)),
            Ok(Some(TurnEvent { kind: None })) => self.broken(ErrorClass::Internal),
            Ok(None) => {
                self.stream = None;
                // A stream that ends after events but before a terminal one is a failure.
                if self.sent > 0 { self.failed_after_start() } else { None }
            }
            Err(status) => {
                let class = ErrorClass::from_status(&status);
                tracing::warn!(worker = %self.worker, code = ?status.code(), sent = self.sent, "worker stream broke");
                metrics::counter!(m::WORKER_ERRORS, "class" => class.as_label()).increment(1);
                self.stats.worker_error(class.as_label());
                self.broken(class)
            }
        }
    }

    fn item(&mut self, kind: turn_event::Kind) -> RelayItem {
        match kind {
            turn_event::Kind::Event(event) => {
                if self.sent == 0 && event.event_type == "response.created" {
                    self.created = serde_json::from_slice::<Value>(&event.json)
                        .ok()
                        .and_then(|mut v| v.get_mut("response").map(Value::take));
                }
                self.sent += 1;
                if event.terminal {
                    self.stream = None;
                }
                RelayItem::Event {
                    event_type: event.event_type,
                    json: event.json,
                    terminal: event.terminal,
                    engine_ttft_us: event.engine_ttft_us,
                }
            }
            turn_event::Kind::Error(error) => {
                self.stream = None;
                RelayItem::Error(error)
            }
            turn_event::Kind::Final(response) => {
                self.stream = None;
                RelayItem::Final { status: response.status as u16, json: response.json }
            }
        }
    }

    fn broken(&mut self, class: ErrorClass) -> Option<RelayItem> {
        self.stream = None;
        self.retryable_failure = self.sent == 0 && class.is_retryable();
        if self.sent > 0 { self.failed_after_start() } else { Some(RelayItem::Error(unavailable(class))) }
    }

    fn failed_after_start(&mut self) -> Option<RelayItem> {
        let mut response = self.created.take()?;
        response["status"] = json!("failed");
        response["output"] = json!([]);
        response["error"] =
            json!({"code": "server_error", "message": "The worker serving this response became unavailable."});
        let mut event = json!({"type": "response.failed", "sequence_number": self.sent});
        if let Some(stream_id) = &self.stream_id {
            event["stream_id"] = json!(stream_id);
        }
        event["response"] = response;
        self.sent += 1;
        metrics::counter!(m::RESPONSES_FAILED_MIDSTREAM).increment(1);
        Some(RelayItem::Event {
            event_type: "response.failed".into(),
            json: event.to_string().into_bytes(),
            terminal: true,
            engine_ttft_us: 0,
        })
    }
}
