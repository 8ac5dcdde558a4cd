//! `POST /v1/responses/input_tokens`: how many input tokens a create with this body would
//! have. The body is a create's; a worker renders its prompt with the model's tokenizer exactly
//! as the turn would (the chain's tokens too, with `previous_response_id`) and runs nothing.
//! With `previous_response_id` the id's owner answers (it holds the chain); otherwise the worker
//! a create would be placed on.

use axum::extract::{Request, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use tether_common::ErrorClass;
use tether_proto::worker::v1::{ApiError, Delivery, Transport, TurnRequest, response_body};

use crate::envelope::Envelope;
use crate::error::{http_error, unavailable};
use crate::http::responses::{read_body, with_request_id};
use crate::state::{EdgeState, request_id};

pub async fn count(State(state): State<EdgeState>, request: Request) -> Response {
    let request_id = request_id();
    let response = count_inner(&state, request, &request_id).await;
    with_request_id(response, &request_id)
}

async fn count_inner(state: &EdgeState, request: Request, request_id: &str) -> Response {
    let headers = request.headers().clone();
    let tenant = match state.auth.tenant(&headers) {
        Ok(tenant) => tenant,
        Err(error) => return http_error(&error),
    };
    if let Err(error) = state.admission.check_rate(&tenant) {
        return http_error(&error);
    }
    let body = match read_body(state, request).await {
        Ok(body) => body,
        Err(error) => return http_error(&error),
    };
    let envelope = match Envelope::parse(&body) {
        Ok(envelope) => envelope,
        Err(rejection) => return http_error(&rejection.error),
    };
    let key = match &envelope.previous {
        Some(previous) => previous.session_key(),
        None => state.place(&tenant, &headers, envelope.prompt_cache_key.as_deref(), envelope.leading),
    };
    let turn = TurnRequest {
        tenant: tenant.to_string(),
        session: key.0,
        body: body.to_vec(),
        transport: Transport::Http as i32,
        delivery: Delivery::Final as i32,
        stream_id: String::new(),
        connection: 0,
        request_id: request_id.to_owned(),
        resume: None,
    };
    match ask(state, turn).await {
        Ok(json) => ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], json).into_response(),
        Err(error) => http_error(&error),
    }
}

/// Asks the key's owner; a worker that refuses (it drains) or is gone is ejected and the next
/// owner asked. Counting changes nothing, so asking again is always safe.
async fn ask(state: &EdgeState, turn: TurnRequest) -> Result<Vec<u8>, ApiError> {
    let key = tether_common::SessionKey(turn.session);
    let reply = state
        .workers
        .ask(key, |mut client| {
            let turn = turn.clone();
            async move { client.count_input_tokens(turn).await }
        })
        .await?;
    match reply {
        Some(response_body::Kind::Json(json)) => Ok(json),
        Some(response_body::Kind::Error(error)) => Err(error),
        None => Err(unavailable(ErrorClass::Internal)),
    }
}
