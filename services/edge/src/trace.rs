//! The edge's span for a turn, `edge.turn`: the root of the turn's trace, or the child of the
//! `traceparent` a client sent with its HTTP request. A WebSocket turn starts a trace of its
//! own (one trace per turn, however long the connection lives) linked to the `traceparent` of
//! the upgrade request, if there was one.

use axum::http::HeaderMap;
use opentelemetry::Context;
use tracing::{Span, field};

/// `edge.turn` for `POST /v1/responses`, continuing the client's trace when it sent one.
pub fn http_turn(headers: &HeaderMap, request_id: &str) -> Span {
    let span = turn_span("http", request_id);
    tether_common::trace::set_parent(&span, tether_common::trace::from_headers(headers));
    span
}

/// `edge.turn` for a `response.create` on a WebSocket: a new trace linked to the connection's.
pub fn ws_turn(connection: &Context, request_id: &str) -> Span {
    let span = turn_span("websocket", request_id);
    tether_common::trace::link(&span, connection);
    span
}

fn turn_span(transport: &'static str, request_id: &str) -> Span {
    tracing::info_span!("edge.turn", otel.kind = "server", transport, request_id, session = field::Empty)
}

/// Notes the session the turn was placed by on the current `edge.turn`.
pub fn record_session(key: tether_common::SessionKey) {
    Span::current().record("session", field::display(format_args!("{:016x}", key.0)));
}
