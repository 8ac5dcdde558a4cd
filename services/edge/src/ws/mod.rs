//! WebSocket mode: `GET /v1/responses` with an upgrade. Authentication and admission happen
//! in the handshake, so a refused client gets a plain HTTP 401 or 429.

mod connection;
pub mod lanes;

use axum::extract::State;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::http::HeaderMap;
use axum::response::Response;

use crate::error::{api_error, http_error, invalid};
use crate::state::EdgeState;

pub async fn upgrade(
    State(state): State<EdgeState>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let Ok(upgrade) = upgrade else { return not_an_upgrade() };
    let tenant = match state.auth.tenant(&headers) {
        Ok(tenant) => tenant,
        Err(error) => return http_error(&error),
    };
    if state.draining.is_cancelled() {
        return http_error(&api_error(
            503,
            "server_error",
            "server_shutting_down",
            "This server is shutting down; reconnect.",
            "",
        ));
    }
    if let Err(error) = state.admission.check_rate(&tenant) {
        return http_error(&error);
    }
    let admitted = match state.admission.connection(&tenant) {
        Ok(admitted) => admitted,
        Err(error) => return http_error(&error),
    };
    let key = state.place(&tenant, &headers, None, None);
    // Each turn on the socket is a trace of its own, linked to this one.
    let trace = tether_common::trace::from_headers(&headers);
    let limit = state.config.max_message_bytes;
    // Small I/O buffers: tungstenite's 128 KiB defaults cost ~135 KB per idle connection;
    // buffers grow when a large message passes.
    upgrade
        .read_buffer_size(4 * 1024)
        .write_buffer_size(4 * 1024)
        .max_message_size(limit)
        .max_frame_size(limit)
        .on_upgrade(move |socket| connection::run(socket, state, tenant, key, admitted, trace))
}

/// The reply to a plain GET on the WebSocket path.
pub fn not_an_upgrade() -> Response {
    let mut error = invalid(
        "invalid_request",
        "GET /v1/responses needs a WebSocket upgrade; create responses over HTTP with POST.",
        "",
    );
    error.status = 400;
    http_error(&error)
}
