//! `POST /v1/responses` (JSON or SSE), `GET /v1/responses/{id}` and `DELETE`.

use std::convert::Infallible;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tether_common::{ErrorClass, ResponseId};
use tether_proto::worker::v1::{ApiError, Delivery, ResponseRef, Transport, TurnRequest, response_body};

use crate::app::{EdgeState, request_id, with_request_id};
use crate::envelope::Envelope;
use crate::error::{api_error, http_error, rate_limited, unavailable};
use crate::metrics as m;
use crate::relay::{self, RelayItem};

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

pub async fn create(
    State(state): State<EdgeState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let request_id = request_id();
    let response = create_inner(&state, &headers, body, &request_id).await;
    let outcome = if response.status().is_success() { "ok" } else { "error" };
    metrics::counter!(m::REQUESTS, "transport" => "http", "outcome" => outcome).increment(1);
    with_request_id(response, &request_id)
}

async fn create_inner(
    state: &EdgeState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    request_id: &str,
) -> Response {
    let started = Instant::now();
    let tenant = match state.auth.tenant(headers) {
        Ok(tenant) => tenant,
        Err(error) => return http_error(&error),
    };
    let body = match body {
        Ok(body) if body.len() <= state.config.max_message_bytes => body,
        Ok(_) => {
            return http_error(&api_error(
                413,
                "invalid_request_error",
                "request_too_large",
                "The request body is too large.",
                "",
            ));
        }
        Err(rejection) => return http_error(&body_error(&rejection, state.config.max_message_bytes)),
    };
    let envelope = match Envelope::parse(&body) {
        Ok(envelope) => envelope,
        Err(rejection) => return http_error(&rejection.error),
    };
    let key = match &envelope.previous {
        Some(previous) => previous.session_key(),
        None => state.place(&tenant, headers, envelope.prompt_cache_key.as_deref()),
    };
    let Ok(permit) = state.in_flight.clone().try_acquire_owned() else {
        return http_error(&rate_limited("Too many responses in progress on this server. Retry shortly."));
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
    };
    let mut relay = match relay::start_routed(state, key, turn).await {
        Ok(relay) => relay,
        Err(error) => return http_error(&error),
    };
    let first = relay.next().await;
    metrics::histogram!(m::FIRST_EVENT_SECONDS).record(started.elapsed().as_secs_f64());
    match first {
        None => http_error(&unavailable(ErrorClass::Unavailable)),
        Some(RelayItem::Error(error)) => http_error(&error),
        Some(RelayItem::Final { status, json }) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
            if status.is_success() {
                ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], json).into_response()
            } else {
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
            // Stream the rest as SSE; the guards live as long as the body.
            let stream = futures_util::stream::unfold(
                (Some(event), relay, permit),
                |(pending, mut relay, permit)| async move {
                    let item = match pending {
                        Some(item) => Some(item),
                        None => relay.next().await,
                    };
                    let bytes = match item? {
                        RelayItem::Event { event_type, json, .. } => sse_frame(&event_type, &json),
                        RelayItem::Error(error) => {
                            // A pre-creation error after events cannot happen; keep the flat
                            // SSE error shape if it ever does.
                            let flat = serde_json::json!({"type": "error", "code": error.code, "message": error.message, "param": null, "sequence_number": 0});
                            sse_frame("error", flat.to_string().as_bytes())
                        }
                        RelayItem::Final { .. } => return None,
                    };
                    metrics::counter!(m::EVENTS_RELAYED).increment(1);
                    Some((Ok::<_, Infallible>(bytes), (None, relay, permit)))
                },
            );
            Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, "text/event-stream")
                .header(header::CACHE_CONTROL, "no-cache")
                .body(Body::from_stream(stream))
                .expect("static response parts")
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

enum Lookup {
    Get,
    Delete,
}

async fn lookup(state: &EdgeState, headers: &HeaderMap, id: &str, kind: Lookup) -> Response {
    let request_id = request_id();
    let tenant = match state.auth.tenant(headers) {
        Ok(tenant) => tenant,
        Err(error) => return http_error(&error),
    };
    let Some(parsed) = ResponseId::parse(id) else { return with_request_id(http_error(&not_found(id)), &request_id) };
    let Some(worker) = state.workers.owner(parsed.session_key()) else {
        return http_error(&unavailable(ErrorClass::Unavailable));
    };
    let reference = ResponseRef { tenant: tenant.to_string(), response_id: id.to_owned(), local_only: false };
    let mut client = worker.client.clone();
    let reply = match kind {
        Lookup::Get => client.get_response(reference).await,
        Lookup::Delete => client.delete_response(reference).await,
    };
    let response = match reply.map(|r| r.into_inner().kind) {
        Ok(Some(response_body::Kind::Json(json))) => {
            ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], json).into_response()
        }
        Ok(Some(response_body::Kind::Error(error))) => http_error(&error),
        Ok(None) => http_error(&not_found(id)),
        Err(status) => http_error(&unavailable(ErrorClass::from_grpc(status.code()))),
    };
    with_request_id(response, &request_id)
}

pub async fn retrieve(State(state): State<EdgeState>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    lookup(&state, &headers, &id, Lookup::Get).await
}

pub async fn delete(State(state): State<EdgeState>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    lookup(&state, &headers, &id, Lookup::Delete).await
}
