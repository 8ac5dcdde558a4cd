//! `POST /v1/responses` (JSON or SSE), `GET /v1/responses/{id}` (JSON, or a replay as SSE with
//! `?stream=true`), `DELETE`, and `POST /v1/responses/{id}/cancel` (a turn in flight).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, Path, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body::Body as _;
use tether_common::{ErrorClass, ResponseId};
use tether_proto::worker::v1::{ApiError, Delivery, ResponseRef, Transport, TurnRequest, response_body};

use futures_util::{Stream, StreamExt};
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::admission::{Outcome, TurnGuard, count_unadmitted};
use crate::envelope::Envelope;
use crate::error::{api_error, http_error, unavailable};
use crate::metrics as m;
use crate::relay::{self, RelayItem};
use crate::state::{EdgeState, request_id};

pub fn with_request_id(mut response: Response, request_id: &str) -> Response {
    if let Ok(value) = HeaderValue::from_str(request_id) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}

fn body_error(rejection: &BytesRejection, limit: usize) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        api_error(
            413,
            "invalid_request_error",
            "request_too_large",
            format!("The request body exceeds {limit} bytes."),
            "",
        )
    } else {
        api_error(400, "invalid_request_error", "invalid_body", "The request body could not be read.", "")
    }
}

pub async fn create(State(state): State<EdgeState>, request: Request) -> Response {
    let request_id = request_id();
    let headers = request.headers().clone();
    let span = crate::trace::http_turn(&headers, &request_id);
    let response = create_inner(&state, &headers, request, &request_id).instrument(span).await;
    with_request_id(response, &request_id)
}

/// Reads the whole body within `--body-read-timeout` (a body that never ends gets 408) and
/// under `--max-message-bytes` (413, at once for a body whose announced length exceeds it).
pub(crate) async fn read_body(state: &EdgeState, request: Request) -> Result<Bytes, ApiError> {
    let limit = state.config.max_message_bytes;
    let too_large = || {
        api_error(
            413,
            "invalid_request_error",
            "request_too_large",
            format!("The request body exceeds {limit} bytes."),
            "",
        )
    };
    if request.body().size_hint().lower() > limit as u64 {
        return Err(too_large());
    }
    let read = <Result<Bytes, BytesRejection> as FromRequest<()>>::from_request(request, &());
    match tokio::time::timeout(state.config.body_read_timeout, read).await {
        Ok(Ok(Ok(body))) if body.len() <= limit => Ok(body),
        Ok(Ok(Ok(_))) => Err(too_large()),
        Ok(Ok(Err(rejection))) => Err(body_error(&rejection, limit)),
        Ok(Err(never)) => match never {},
        Err(_) => Err(api_error(
            408,
            "invalid_request_error",
            "request_timeout",
            "The request body was not received in time.",
            "",
        )),
    }
}

async fn create_inner(state: &EdgeState, headers: &HeaderMap, request: Request, request_id: &str) -> Response {
    let tenant = match state.auth.tenant(headers) {
        Ok(tenant) => tenant,
        Err(error) => {
            count_unadmitted("http", None);
            return http_error(&error);
        }
    };
    let refused = |error: &ApiError| {
        count_unadmitted("http", Some(&tenant));
        http_error(error)
    };
    if let Err(error) = state.admission.check_rate(&tenant) {
        return refused(&error);
    }
    let body = match read_body(state, request).await {
        Ok(body) => body,
        Err(error) => {
            let mut response = refused(&error);
            if error.status == 408 {
                // The rest of the body may never come: do not keep reading it.
                response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            return response;
        }
    };
    let envelope = match Envelope::parse(&body) {
        Ok(envelope) => envelope,
        Err(rejection) => return refused(&rejection.error),
    };
    let key = match &envelope.previous {
        Some(previous) => previous.session_key(),
        None => state.place(&tenant, headers, envelope.prompt_cache_key.as_deref(), envelope.leading),
    };
    let mut guard = match state.admission.turn(&tenant, "http") {
        Ok(guard) => guard,
        Err(error) => return refused(&error),
    };
    let turn = TurnRequest {
        tenant: tenant.to_string(),
        session: key.0,
        body: body.to_vec(),
        transport: Transport::Http as i32,
        delivery: if envelope.stream { Delivery::Events } else { Delivery::Final } as i32,
        stream_id: String::new(),
        connection: 0,
        request_id: request_id.to_owned(),
        resume: None,
    };
    let mut relay = match relay::start_routed(state, key, turn).await {
        Ok(relay) => relay,
        Err(error) => {
            guard.set_outcome(Outcome::Error);
            return http_error(&error);
        }
    };
    let first = relay.next().await;
    guard.first_event();
    match first {
        None => {
            guard.set_outcome(Outcome::Error);
            http_error(&unavailable(ErrorClass::Unavailable))
        }
        Some(RelayItem::Error(error)) => {
            guard.set_outcome(Outcome::Error);
            http_error(&error)
        }
        Some(RelayItem::Final { status, json }) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
            if status.is_success() {
                guard.set_outcome(Outcome::Ok);
                ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], json).into_response()
            } else {
                guard.set_outcome(Outcome::Failed);
                let error = api_error(
                    status.as_u16(),
                    "server_error",
                    "server_error",
                    "The model backend failed while generating the response.",
                    "",
                );
                http_error(&error)
            }
        }
        Some(event @ RelayItem::Event { .. }) => {
            // A task relays the rest, so a client that stops reading is noticed (its send
            // waits) and cut after `--client-read-timeout`; the guard lives in that task.
            let (frames, body) = mpsc::channel::<Bytes>(SSE_BUFFER);
            let cut = Arc::new(AtomicBool::new(false));
            let rest = Box::pin(futures_util::stream::unfold(relay, |mut relay| async move {
                relay.next().await.map(|item| (item, relay))
            }));
            let pump = pump_sse(event, rest, guard, frames, state.config.client_read_timeout, cut.clone());
            tokio::spawn(pump.in_current_span());
            let stream = futures_util::stream::unfold((body, cut), |(mut body, cut)| async move {
                match body.recv().await {
                    Some(frame) => Some((Ok(frame), (body, cut))),
                    // A stream cut for a slow client ends with an error, so the connection is
                    // aborted rather than the body ended as if complete.
                    None if cut.load(Ordering::Acquire) => {
                        Some((Err(std::io::Error::other("client read too slowly")), (body, cut)))
                    }
                    None => None,
                }
            });
            Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, "text/event-stream")
                .header(header::CACHE_CONTROL, "no-cache")
                .body(Body::from_stream(stream))
                .expect("static response parts")
        }
    }
}

/// SSE frames buffered between the relay task and the connection.
const SSE_BUFFER: usize = 32;

/// Relays a response's events to an SSE body until its terminal event, the client's
/// disconnect (the body is dropped) or a send that waited `read_timeout`.
async fn pump_sse(
    first: RelayItem,
    mut rest: impl Stream<Item = RelayItem> + Unpin,
    mut guard: TurnGuard,
    frames: mpsc::Sender<Bytes>,
    read_timeout: Duration,
    cut: Arc<AtomicBool>,
) {
    let mut pending = Some(first);
    let relayed = metrics::counter!(m::EVENTS_RELAYED);
    loop {
        let item = match pending.take() {
            Some(item) => item,
            None => match rest.next().await {
                Some(item) => item,
                None => return,
            },
        };
        let frame = match item {
            RelayItem::Event { event_type, json, terminal, engine_ttft_us } => {
                guard.relayed(&event_type, engine_ttft_us);
                if terminal {
                    guard.set_outcome(if event_type == "response.failed" { Outcome::Failed } else { Outcome::Ok });
                }
                sse_frame(&event_type, &json)
            }
            RelayItem::Error(error) => {
                // A pre-creation error after events cannot happen; keep the flat SSE error
                // shape if it ever does.
                guard.set_outcome(Outcome::Error);
                let flat = serde_json::json!({"type": "error", "code": error.code, "message": error.message, "param": null, "sequence_number": 0});
                sse_frame("error", flat.to_string().as_bytes())
            }
            RelayItem::Final { .. } => return,
        };
        match tokio::time::timeout(read_timeout, frames.send(frame)).await {
            Ok(Ok(())) => relayed.increment(1),
            // The client went away: the body was dropped.
            Ok(Err(_)) => {
                guard.set_outcome(Outcome::Cancelled);
                return;
            }
            Err(_) => {
                tracing::debug!("sse client read nothing within the read timeout, cutting the response");
                metrics::counter!(m::SLOW_CLIENTS, "transport" => "http").increment(1);
                guard.set_outcome(Outcome::Cancelled);
                cut.store(true, Ordering::Release);
                return;
            }
        }
    }
}

fn sse_frame(event_type: &str, json: &[u8]) -> Bytes {
    let mut frame = Vec::with_capacity(json.len() + event_type.len() + 16);
    frame.extend_from_slice(b"event: ");
    frame.extend_from_slice(event_type.as_bytes());
    frame.extend_from_slice(b"\ndata: ");
    frame.extend_from_slice(json);
    frame.extend_from_slice(b"\n\n");
    Bytes::from(frame)
}

fn not_found(id: &str) -> ApiError {
    api_error(404, "invalid_request_error", "not_found", format!("Response with id '{id}' not found."), "")
}

#[derive(Clone, Copy, PartialEq)]
enum Lookup {
    Get,
    /// `GET ?stream=true`: the stored Response replayed as SSE events.
    Replay,
    Delete,
    /// `POST /v1/responses/{id}/cancel`: stops the turn in flight.
    Cancel,
}

async fn lookup(state: &EdgeState, headers: &HeaderMap, id: &str, kind: Lookup) -> Response {
    let request_id = request_id();
    let tenant = match state.auth.tenant(headers) {
        Ok(tenant) => tenant,
        Err(error) => return http_error(&error),
    };
    if let Err(error) = state.admission.check_rate(&tenant) {
        return with_request_id(http_error(&error), &request_id);
    }
    let Some(parsed) = ResponseId::parse(id) else { return with_request_id(http_error(&not_found(id)), &request_id) };
    let reference = ResponseRef { tenant: tenant.to_string(), response_id: id.to_owned(), local_only: false };
    // A worker that is gone is skipped (ejected, the next owner asked, which pulls the chain):
    // reads and deletes are safe to repeat; a cancel reaches the turn only on the worker running
    // it, and a turn on a worker that is gone is over anyway.
    let reply = state
        .workers
        .ask(parsed.session_key(), |mut client| {
            let reference = reference.clone();
            async move {
                match kind {
                    Lookup::Get | Lookup::Replay => client.get_response(reference).await,
                    Lookup::Delete => client.delete_response(reference).await,
                    Lookup::Cancel => client.cancel_response(reference).await,
                }
            }
        })
        .await;
    let response = match reply {
        Ok(Some(response_body::Kind::Json(json))) if kind == Lookup::Replay => {
            match serde_json::from_slice::<serde_json::Value>(&json) {
                Ok(stored) => (
                    [
                        (header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream")),
                        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
                    ],
                    super::replay::sse_body(&stored),
                )
                    .into_response(),
                Err(_) => http_error(&unavailable(ErrorClass::Internal)),
            }
        }
        Ok(Some(response_body::Kind::Json(json))) => {
            ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], json).into_response()
        }
        Ok(Some(response_body::Kind::Error(error))) => http_error(&error),
        Ok(None) => http_error(&not_found(id)),
        Err(error) => http_error(&error),
    };
    with_request_id(response, &request_id)
}

pub async fn retrieve(
    State(state): State<EdgeState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Response {
    let kind = if wants_stream(query.as_deref()) { Lookup::Replay } else { Lookup::Get };
    lookup(&state, &headers, &id, kind).await
}

/// Whether the query asks for a stream (`stream=true`, as the SDK sends it); the other
/// parameters (`include[]`, `starting_after`, `include_obfuscation`) change nothing here.
fn wants_stream(query: Option<&str>) -> bool {
    query
        .unwrap_or_default()
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .any(|(key, value)| key == "stream" && (value.eq_ignore_ascii_case("true") || value == "1"))
}

pub async fn delete(State(state): State<EdgeState>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    lookup(&state, &headers, &id, Lookup::Delete).await
}

/// Routed like a lookup: the turn runs on the owner of its id's session key.
pub async fn cancel(State(state): State<EdgeState>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    lookup(&state, &headers, &id, Lookup::Cancel).await
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use tokio::sync::mpsc;

    use super::pump_sse;
    use crate::admission::Admission;
    use crate::config::EdgeConfig;
    use crate::relay::RelayItem;

    fn delta() -> RelayItem {
        RelayItem::Event {
            event_type: "response.output_text.delta".into(),
            json: br#"{"type":"response.output_text.delta","delta":"x"}"#.to_vec(),
            terminal: false,
            engine_ttft_us: 0,
        }
    }

    #[tokio::test]
    async fn an_sse_client_that_reads_nothing_is_cut_and_its_slot_freed() {
        let config = EdgeConfig::for_test();
        let admission = Admission::new(&config);
        let guard = admission.turn("default", "http").unwrap();
        assert_eq!(admission.in_flight(config.max_in_flight), 1);
        // The body (the receiver) is alive but never read: the response would run forever.
        let (frames, _body) = mpsc::channel(4);
        let cut = Arc::new(AtomicBool::new(false));
        let endless = futures_util::stream::repeat_with(delta);
        let pump = pump_sse(delta(), endless, guard, frames, Duration::from_millis(200), cut.clone());
        tokio::time::timeout(Duration::from_secs(10), pump).await.expect("cut after the read timeout");
        assert!(cut.load(Ordering::Acquire), "the body ends with an error, not as if complete");
        assert_eq!(admission.in_flight(config.max_in_flight), 0, "the slot is free");
    }

    #[tokio::test]
    async fn a_client_that_goes_away_frees_the_slot_at_once() {
        let config = EdgeConfig::for_test();
        let admission = Admission::new(&config);
        let guard = admission.turn("default", "http").unwrap();
        let (frames, body) = mpsc::channel(4);
        drop(body);
        let cut = Arc::new(AtomicBool::new(false));
        let pump = pump_sse(
            delta(),
            futures_util::stream::repeat_with(delta),
            guard,
            frames,
            Duration::from_secs(30),
            cut.clone(),
        );
        tokio::time::timeout(Duration::from_secs(10), pump).await.expect("stops at the first send");
        assert!(!cut.load(Ordering::Acquire));
        assert_eq!(admission.in_flight(config.max_in_flight), 0);
    }
}
