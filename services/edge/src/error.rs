//! Edge errors and their two wire shapes: an HTTP status with `{"error":{...}}`, and the
//! nested WebSocket `error` event.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tether_common::ErrorClass;
use tether_proto::worker::v1::ApiError;

#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    /// An error in the protocol's own terms (from the worker or the envelope check).
    #[error("{}", .0.message)]
    Api(ApiError),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("shutdown deadline exceeded")]
    ShutdownDeadline,
}

/// Builds an [`ApiError`].
pub fn api_error(status: u16, kind: &str, code: &str, message: impl Into<String>, param: &str) -> ApiError {
    ApiError {
        status: u32::from(status),
        r#type: kind.into(),
        code: code.into(),
        message: message.into(),
        param: param.into(),
    }
}

pub fn invalid(code: &str, message: impl Into<String>, param: &str) -> ApiError {
    api_error(400, "invalid_request_error", code, message, param)
}

pub fn previous_not_found(id: &str) -> ApiError {
    invalid(
        "previous_response_not_found",
        format!("Previous response with id '{id}' not found."),
        "previous_response_id",
    )
}

pub fn rate_limited(message: &str) -> ApiError {
    api_error(429, "rate_limit_error", "rate_limit_exceeded", message, "")
}

pub fn unavailable(class: ErrorClass) -> ApiError {
    let status = class.http_status().as_u16();
    api_error(
        status,
        "server_error",
        "server_error",
        "No worker is available to serve this request. Retry the request.",
        "",
    )
}

fn null_if_empty(text: &str) -> Value {
    if text.is_empty() { Value::Null } else { Value::String(text.into()) }
}

/// The `error` object of the protocol.
pub fn error_object(error: &ApiError) -> Value {
    json!({"message": error.message, "type": error.r#type, "param": null_if_empty(&error.param), "code": null_if_empty(&error.code)})
}

/// The nested WebSocket `error` event.
pub fn ws_error_event(error: &ApiError, stream_id: Option<&str>) -> String {
    let mut event = json!({"type": "error", "status": error.status, "error": error_object(error)});
    if let Some(stream_id) = stream_id {
        event["stream_id"] = Value::String(stream_id.into());
    }
    event.to_string()
}

/// An HTTP error reply with the protocol's body.
pub fn http_error(error: &ApiError) -> Response {
    let status = StatusCode::from_u16(error.status as u16).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, axum::Json(json!({"error": error_object(error)}))).into_response();
    if status == StatusCode::NOT_IMPLEMENTED {
        // The SDK retries every 5xx: an endpoint that is not implemented stays so.
        response.headers_mut().insert("x-should-retry", HeaderValue::from_static("false"));
    } else if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
        response.headers_mut().insert("x-should-retry", HeaderValue::from_static("true"));
    }
    response
}
