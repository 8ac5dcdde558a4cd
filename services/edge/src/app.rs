//! The edge's router: the Responses API routes and the operations endpoints over one
//! [`EdgeState`].

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use tether_common::ops;

use crate::state::EdgeState;
use crate::{http, ws};

/// Returns the edge's router: the Responses API and the operations endpoints.
pub fn router(state: EdgeState) -> Router {
    let readiness = state.readiness.clone();
    let body_limit = state.config.max_message_bytes;
    Router::new()
        .route("/v1/responses", post(http::responses::create).get(ws::upgrade))
        .route("/v1/responses/{id}", get(http::responses::retrieve).delete(http::responses::delete))
        .route("/v1/responses/{id}/cancel", post(http::responses::cancel))
        .route("/v1/responses/compact", post(http::unsupported::compact))
        .route("/v1/responses/input_tokens", post(http::input_tokens::count))
        .route("/v1/responses/{id}/input_items", get(http::input_items::list))
        .route("/v1/models", get(http::models::list))
        .route("/v1/models/{id}", get(http::models::retrieve))
        .route("/v1/cluster", get(http::models::cluster))
        // The operator view: its JSON snapshot and the page that shows it.
        .route("/v1/cluster/status", get(http::cluster::status))
        .route("/dashboard", get(http::cluster::dashboard))
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
        .merge(ops::router(readiness))
        .fallback(http::unsupported::not_found)
        .method_not_allowed_fallback(http::unsupported::method_not_allowed)
        .layer(axum::middleware::from_fn(http::unread_body::mark_unread))
}
