//! `GET /v1/responses/{id}/input_items`: a page of a stored response's input items, listed by
//! the worker that owns the id's session key (it pulls a chain that moved to it, as for a
//! retrieve). The edge checks the query: `limit` (1 to 100, default 20), `order` (`asc` or
//! `desc`, default `desc`), `after` (an item id); `include[]` is accepted and changes nothing.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use tether_common::ResponseId;
use tether_proto::worker::v1::{ApiError, ListInputItemsRequest, ResponseRef, response_body};

use crate::error::{api_error, http_error, invalid};
use crate::http::responses::with_request_id;
use crate::state::{EdgeState, request_id};

const DEFAULT_LIMIT: u32 = 20;
const MAX_LIMIT: u32 = 100;

/// The page a client asked for.
#[derive(Debug, PartialEq, Eq)]
struct PageQuery {
    limit: u32,
    ascending: bool,
    after: String,
}

fn parse_query(pairs: &[(String, String)]) -> Result<PageQuery, ApiError> {
    let mut page = PageQuery { limit: DEFAULT_LIMIT, ascending: false, after: String::new() };
    for (key, value) in pairs {
        match key.as_str() {
            "limit" => {
                page.limit = value.parse().ok().filter(|limit| (1..=MAX_LIMIT).contains(limit)).ok_or_else(|| {
                    invalid("invalid_value", format!("'limit' must be an integer from 1 to {MAX_LIMIT}."), "limit")
                })?;
            }
            "order" => {
                page.ascending = match value.as_str() {
                    "asc" => true,
                    "desc" => false,
                    _ => return Err(invalid("invalid_value", "'order' must be 'asc' or 'desc'.", "order")),
                };
            }
            "after" => page.after = value.clone(),
            // `include[]` asks for fields tether's items do not have; other keys are ignored.
            _ => {}
        }
    }
    Ok(page)
}

fn not_found(id: &str) -> ApiError {
    api_error(404, "invalid_request_error", "not_found", format!("Response with id '{id}' not found."), "")
}

pub async fn list(
    State(state): State<EdgeState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Response {
    let request_id = request_id();
    let response = list_inner(&state, &headers, &id, query).await;
    with_request_id(response, &request_id)
}

async fn list_inner(
    state: &EdgeState,
    headers: &HeaderMap,
    id: &str,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Response {
    let tenant = match state.auth.tenant(headers) {
        Ok(tenant) => tenant,
        Err(error) => return http_error(&error),
    };
    if let Err(error) = state.admission.check_rate(&tenant) {
        return http_error(&error);
    }
    let page = match query {
        Ok(Query(pairs)) => parse_query(&pairs),
        Err(_) => Err(invalid("invalid_query", "The query string could not be parsed.", "")),
    };
    let page = match page {
        Ok(page) => page,
        Err(error) => return http_error(&error),
    };
    let Some(parsed) = ResponseId::parse(id) else { return http_error(&not_found(id)) };
    let request = ListInputItemsRequest {
        response: Some(ResponseRef { tenant: tenant.to_string(), response_id: id.to_owned(), local_only: false }),
        limit: page.limit,
        ascending: page.ascending,
        after: page.after,
    };
    // A listing changes nothing: a worker that is gone is skipped for the next owner.
    let reply = state
        .workers
        .ask(parsed.session_key(), |mut client| {
            let request = request.clone();
            async move { client.list_input_items(request).await }
        })
        .await;
    match reply {
        Ok(Some(response_body::Kind::Json(json))) => {
            ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], json).into_response()
        }
        Ok(Some(response_body::Kind::Error(error))) => http_error(&error),
        Ok(None) => http_error(&not_found(id)),
        Err(error) => http_error(&error),
    }
}

#[cfg(test)]
mod tests {
    use super::{PageQuery, parse_query};

    fn pairs(query: &[(&str, &str)]) -> Vec<(String, String)> {
        query.iter().map(|(key, value)| ((*key).to_owned(), (*value).to_owned())).collect()
    }

    #[test]
    fn defaults_and_accepted_values() {
        assert_eq!(parse_query(&[]).unwrap(), PageQuery { limit: 20, ascending: false, after: String::new() });
        let query = pairs(&[("limit", "100"), ("order", "asc"), ("after", "msg_1"), ("include[]", "x")]);
        assert_eq!(parse_query(&query).unwrap(), PageQuery { limit: 100, ascending: true, after: "msg_1".into() });
    }

    #[test]
    fn bad_values_name_their_param() {
        for (key, value) in [("limit", "0"), ("limit", "101"), ("limit", "ten"), ("order", "up")] {
            let error = parse_query(&pairs(&[(key, value)])).unwrap_err();
            assert_eq!((error.status, error.param.as_str()), (400, key), "{key}={value}");
        }
    }
}
