//! `GET /v1/models` and the operators' cluster view `GET /v1/cluster`.

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tether_common::ErrorClass;
use tether_common::discovery::NodeKind;
use tether_proto::worker::v1::ListModelsRequest;

use crate::error::{http_error, unavailable};
use crate::state::EdgeState;

pub async fn list(State(state): State<EdgeState>, headers: HeaderMap) -> Response {
    let tenant = match state.auth.tenant(&headers) {
        Ok(tenant) => tenant,
        Err(error) => return http_error(&error),
    };
    if let Err(error) = state.admission.check_rate(&tenant) {
        return http_error(&error);
    }
    let Some(worker) = state.workers.any() else { return http_error(&unavailable(ErrorClass::Unavailable)) };
    match worker.client.clone().list_models(ListModelsRequest {}).await {
        Ok(reply) => {
            let data: Vec<Value> = reply
                .into_inner()
                .models
                .into_iter()
                .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "tether"}))
                .collect();
            Json(json!({"object": "list", "data": data})).into_response()
        }
        Err(status) => http_error(&unavailable(ErrorClass::from_grpc(status.code()))),
    }
}

/// The live workers and shards; operators only (the admin key with `--auth keys`).
pub async fn cluster(State(state): State<EdgeState>, headers: HeaderMap) -> Response {
    if let Err(error) = state.auth.admin(&headers) {
        return http_error(&error);
    }
    let view =
        |kind| -> Vec<Value> { state.members(kind).values().map(|m| json!({"id": m.id, "addr": m.addr})).collect() };
    Json(json!({"workers": view(NodeKind::Worker), "shards": view(NodeKind::Shard)})).into_response()
}
