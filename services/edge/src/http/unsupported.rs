//! What the edge answers for the endpoints tether does not implement, and for every path or
//! method no route matches: always an error object in the protocol's shape, never an empty
//! body (the SDK reads the message from `error`).

use axum::http::{Method, Uri};
use axum::response::Response;

use crate::error::{api_error, http_error};
use crate::http::responses::with_request_id;
use crate::state::request_id;

fn not_implemented(message: &str) -> Response {
    // 501: a retry cannot help (`http_error` sends `x-should-retry: false` for it).
    with_request_id(
        http_error(&api_error(501, "invalid_request_error", "unsupported_endpoint", message, "")),
        &request_id(),
    )
}

/// `POST /v1/responses/compact`: a compacted window needs a model that summarizes; the served
/// models are plain completion models, so tether does not pretend to compact.
pub async fn compact() -> Response {
    not_implemented(
        "POST /v1/responses/compact is not supported by this server. Continue the conversation with \
         previous_response_id: the chain's state stays on the server and is not re-sent.",
    )
}

/// Every path no route matches.
pub async fn not_found(method: Method, uri: Uri) -> Response {
    let message = format!("Unknown path: {method} {}.", uri.path());
    with_request_id(http_error(&api_error(404, "invalid_request_error", "not_found", message, "")), &request_id())
}

/// A known path with a method it does not serve.
pub async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    let message = format!("Method {method} is not allowed on {}.", uri.path());
    with_request_id(
        http_error(&api_error(405, "invalid_request_error", "method_not_allowed", message, "")),
        &request_id(),
    )
}
