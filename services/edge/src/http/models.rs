//! `GET /v1/models`, `GET /v1/models/{id}` and the operators' cluster view `GET /v1/cluster`.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tether_common::ErrorClass;
use tether_common::discovery::NodeKind;
use tether_proto::worker::v1::{ApiError, ListModelsRequest};

use crate::error::{api_error, http_error, unavailable};
use crate::http::responses::with_request_id;
use crate::state::{EdgeState, request_id};

pub async fn list(State(state): State<EdgeState>, headers: HeaderMap) -> Response {
    let request_id = request_id();
    let response = match models(&state, &headers).await {
        Ok(data) => Json(json!({"object": "list", "data": data})).into_response(),
        Err(error) => http_error(&error),
    };
    with_request_id(response, &request_id)
}

/// `GET /v1/models/{id}`: the model object `list` shows, or a 404 for a model no shard serves.
pub async fn retrieve(State(state): State<EdgeState>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let request_id = request_id();
    let response = match models(&state, &headers).await {
        Ok(data) => match data.into_iter().find(|model| model["id"] == id.as_str()) {
            Some(model) => Json(model).into_response(),
            None => http_error(&api_error(
                404,
                "invalid_request_error",
                "model_not_found",
                format!("The model '{id}' does not exist."),
                "model",
            )),
        },
        Err(error) => http_error(&error),
    };
    with_request_id(response, &request_id)
}

/// The served models, as model objects, for an authenticated and admitted caller.
async fn models(state: &EdgeState, headers: &HeaderMap) -> Result<Vec<Value>, ApiError> {
    let tenant = state.auth.tenant(headers)?;
    state.admission.check_rate(&tenant)?;
    let Some(worker) = state.workers.any() else { return Err(unavailable(ErrorClass::Unavailable)) };
    match worker.client.clone().list_models(ListModelsRequest {}).await {
        Ok(reply) => Ok(reply
            .into_inner()
            .models
            .into_iter()
            .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "tether"}))
            .collect()),
        Err(status) => Err(unavailable(ErrorClass::from_grpc(status.code()))),
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
