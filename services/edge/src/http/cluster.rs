//! The operator view over HTTP: `GET /v1/cluster/status` (the JSON snapshot of
//! [`crate::status`]) and `GET /dashboard` (one static page, embedded in the binary, that polls
//! it). Both follow the `/v1/cluster` rule: open with `--auth open`, the admin key with
//! `--auth keys`. The page itself holds no data, so it is served to anyone; it asks for the
//! admin key when the snapshot answers 401/403, keeps it in `sessionStorage` (gone when the tab
//! closes) and sends it as `Authorization: Bearer`, never in a URL.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};

use crate::error::http_error;
use crate::state::EdgeState;

/// The page: plain HTML, CSS and JS, no external resource of any kind.
const DASHBOARD: &str = include_str!("../dashboard.html");

/// Nothing but the page's own inline code and same-origin requests.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
     connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

pub async fn status(State(state): State<EdgeState>, headers: HeaderMap) -> Response {
    if let Err(error) = state.auth.admin(&headers) {
        return http_error(&error);
    }
    let mut response = Json(crate::status::snapshot(&state).await).into_response();
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

pub async fn dashboard() -> Response {
    let mut response = axum::response::Html(DASHBOARD).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    response
}
