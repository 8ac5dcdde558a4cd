//! The rest of the Responses API a stateful server can answer: `GET
//! /v1/responses/{id}/input_items` (the whole context that generated a response, paginated,
//! found on another worker after a crash, per tenant) and `POST /v1/responses/input_tokens`
//! (the count a create's `usage.input_tokens` then reports).

use serde_json::{Value, json};
use tether_edge::config::AuthMode;
use tether_tests::Cluster;
use tether_tests::client::{function_calls, run_tests_tool};

async fn post_as(http: &reqwest::Client, base: &str, key: &str, path: &str, body: &Value) -> (u16, Value) {
    let reply = http.post(format!("{base}{path}")).bearer_auth(key).json(body).send().await.unwrap();
    let status = reply.status().as_u16();
    (status, reply.json().await.unwrap())
}

async fn create(http: &reqwest::Client, base: &str, body: Value) -> Value {
    let (status, response) = post_as(http, base, "sk-local", "/v1/responses", &body).await;
    assert_eq!(status, 200, "{response}");
    assert_eq!(response["status"], "completed", "{response}");
    response
}

async fn get_as(http: &reqwest::Client, base: &str, key: &str, path: &str) -> (u16, Value) {
    let reply = http.get(format!("{base}{path}")).bearer_auth(key).send().await.unwrap();
    let status = reply.status().as_u16();
    (status, reply.json().await.unwrap())
}

async fn list(http: &reqwest::Client, base: &str, id: &str, query: &str) -> Value {
    let (status, page) = get_as(http, base, "sk-local", &format!("/v1/responses/{id}/input_items?{query}")).await;
    assert_eq!(status, 200, "{query}: {page}");
    assert_eq!(page["object"], "list", "{page}");
    page
}

/// What an item says, without its id: compared with what the client sent and got.
fn gist(item: &Value) -> Value {
    match item["type"].as_str() {
        Some("message") => {
            let text: String = match &item["content"] {
                Value::String(text) => text.clone(),
                parts => parts.as_array().unwrap().iter().map(|part| part["text"].as_str().unwrap()).collect(),
            };
            json!(["message", item["role"], text])
        }
        Some("function_call") => json!(["function_call", item["call_id"], item["name"], item["arguments"]]),
        Some("function_call_output") => json!(["function_call_output", item["call_id"], item["output"]]),
        other => panic!("unexpected item type {other:?}: {item}"),
    }
}

fn data(page: &Value) -> Vec<Value> {
    page["data"].as_array().unwrap().clone()
}

fn ids(items: &[Value]) -> Vec<String> {
    items.iter().map(|item| item["id"].as_str().unwrap().to_owned()).collect()
}

/// Three turns: a user message answered by a tool call, the tool's output answered by text,
/// and a follow-up question. Returns the responses and the items the context holds, oldest
/// first, as the client sent and received them.
async fn tool_chain(http: &reqwest::Client, base: &str) -> (Vec<Value>, Vec<Value>) {
    let first = create(
        http,
        base,
        json!({"input": "run the tests", "tools": [run_tests_tool()], "tool_choice": "required",
               "metadata": {"tether_sim_output_tokens": "6"}}),
    )
    .await;
    let call = function_calls(&first)[0].clone();
    let output = json!({"type": "function_call_output", "call_id": call["call_id"], "output": "3 failed"});
    let second = create(
        http,
        base,
        json!({"previous_response_id": first["id"], "input": [output], "tools": [run_tests_tool()],
               "metadata": {"tether_sim_output_tokens": "6"}}),
    )
    .await;
    let third = create(
        http,
        base,
        json!({"previous_response_id": second["id"], "input": "and now?", "tools": [run_tests_tool()],
               "metadata": {"tether_sim_output_tokens": "6"}}),
    )
    .await;
    let mut context = vec![json!({"type": "message", "role": "user", "content": "run the tests"})];
    context.extend(first["output"].as_array().unwrap().iter().cloned());
    context.push(output);
    context.extend(second["output"].as_array().unwrap().iter().cloned());
    context.push(json!({"type": "message", "role": "user", "content": "and now?"}));
    (vec![first, second, third], context)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_items_list_the_whole_context_in_stable_pages() {
    let cluster = Cluster::builder().workers(2).shards(1).start().await;
    let http = reqwest::Client::new();
    let base = cluster.url();
    let (responses, context) = tool_chain(&http, &base).await;
    let third = responses[2]["id"].as_str().unwrap();

    // Oldest first: every earlier input and output, then this turn's input; not its output.
    let ascending = data(&list(&http, &base, third, "order=asc&limit=100").await);
    assert_eq!(ascending.iter().map(gist).collect::<Vec<_>>(), context.iter().map(gist).collect::<Vec<_>>());
    let call = function_calls(&responses[0])[0];
    let listed_call = ascending.iter().find(|item| item["type"] == "function_call").unwrap();
    assert_eq!(listed_call["id"], call["id"], "a function call keeps the id the Response gave it");
    for item in &ascending {
        assert_eq!(item["status"], "completed", "{item}");
        if item["type"] == "message" {
            let part = if item["role"] == "assistant" { "output_text" } else { "input_text" };
            assert_eq!(item["content"][0]["type"], part, "{item}");
        }
    }

    // The default is newest first, 20 at a time.
    let default = list(&http, &base, third, "").await;
    let mut descending = ascending.clone();
    descending.reverse();
    assert_eq!(data(&default), descending);
    assert_eq!(default["has_more"], false);
    assert_eq!(default["first_id"], descending[0]["id"]);
    assert_eq!(default["last_id"], descending.last().unwrap()["id"]);

    // Pages of two, in both orders, follow `after` to the end with the same ids.
    for (order, expected) in [("asc", &ascending), ("desc", &descending)] {
        let mut walked = Vec::new();
        let mut query = format!("order={order}&limit=2");
        loop {
            let page = list(&http, &base, third, &query).await;
            let items = data(&page);
            assert!(items.len() <= 2);
            assert_eq!(page["last_id"], items.last().unwrap()["id"]);
            walked.extend(items);
            if page["has_more"] == false {
                break;
            }
            query = format!("order={order}&limit=2&after={}", page["last_id"].as_str().unwrap());
        }
        assert_eq!(ids(&walked), ids(expected), "{order}");
    }

    // The first turn's context is only its own input; the second's shares the first items'
    // ids with the third's listing.
    let first = data(&list(&http, &base, responses[0]["id"].as_str().unwrap(), "order=asc").await);
    assert_eq!(first.iter().map(gist).collect::<Vec<_>>(), vec![gist(&context[0])]);
    let second = data(&list(&http, &base, responses[1]["id"].as_str().unwrap(), "order=asc").await);
    assert_eq!(ids(&second), ids(&ascending[..second.len()]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_items_answer_from_another_worker_after_the_owner_dies() {
    let mut cluster = Cluster::builder().workers(3).shards(1).start().await;
    let http = reqwest::Client::new();
    let base = cluster.url();
    let (responses, _) = tool_chain(&http, &base).await;
    let third = responses[2]["id"].as_str().unwrap();
    let before = list(&http, &base, third, "order=asc&limit=100").await;
    let owner = responses[2]["x_tether"]["worker"].as_str().unwrap().to_owned();
    cluster.worker(&owner).kill();
    // Membership still lists the dead worker: the edge finds out by calling it.
    let after = list(&http, &base, third, "order=asc&limit=100").await;
    assert_eq!(after, before, "the same items and ids from the replica");
    let page = list(&http, &base, third, &format!("order=asc&limit=2&after={}", ids(&data(&before))[1])).await;
    assert_eq!(ids(&data(&page)), ids(&data(&before)[2..4]));
}

fn two_tenants(config: &mut tether_edge::EdgeConfig) {
    config.auth = AuthMode::Keys;
    config.api_keys = [("sk-alpha".to_owned(), "alpha".to_owned()), ("sk-beta".to_owned(), "beta".to_owned())].into();
}

/// Asserts an error in the protocol's shape and returns its error object.
fn error_of(status: u16, body: &Value, expected: u16, context: &str) -> Value {
    assert_eq!(status, expected, "{context}: {body}");
    let error = body["error"].clone();
    assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()), "{context}: {body}");
    assert_eq!(error["type"], "invalid_request_error", "{context}: {body}");
    error
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_items_are_per_tenant_and_bad_parameters_name_their_param() {
    let cluster = Cluster::builder().workers(2).shards(1).edge_config(two_tenants).start().await;
    let http = reqwest::Client::new();
    let base = cluster.url();
    let (status, response) = post_as(&http, &base, "sk-alpha", "/v1/responses", &json!({"input": "mine"})).await;
    assert_eq!(status, 200, "{response}");
    let id = response["id"].as_str().unwrap();
    let path = |query: &str| format!("/v1/responses/{id}/input_items{query}");

    let (status, page) = get_as(&http, &base, "sk-alpha", &path("")).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(data(&page).len(), 1);
    let (status, body) = get_as(&http, &base, "sk-beta", &path("")).await;
    let error = error_of(status, &body, 404, "another tenant's id");
    assert_eq!(error["code"], "not_found");
    let (status, body) = get_as(&http, &base, "sk-alpha", "/v1/responses/resp_nope/input_items").await;
    error_of(status, &body, 404, "an unknown id");
    let unknown = "resp_0123456789abcdef0123456789abcdef0123456789abcdef";
    let (status, body) = get_as(&http, &base, "sk-alpha", &format!("/v1/responses/{unknown}/input_items")).await;
    error_of(status, &body, 404, "a well-formed unknown id");

    for (query, param) in [
        ("?limit=0", "limit"),
        ("?limit=101", "limit"),
        ("?limit=many", "limit"),
        ("?order=sideways", "order"),
        ("?after=msg_nope", "after"),
    ] {
        let (status, body) = get_as(&http, &base, "sk-alpha", &path(query)).await;
        let error = error_of(status, &body, 400, query);
        assert_eq!(error["param"], param, "{query}: {body}");
    }
    // `include[]` is accepted (and changes nothing).
    let (status, body) =
        get_as(&http, &base, "sk-alpha", &path("?include[]=message.output_text.logprobs&limit=100")).await;
    assert_eq!((status, data(&body)), (200, data(&page)));
}

/// Counts `body`, then creates it: the count is the create's `usage.input_tokens`.
async fn count_then_create(http: &reqwest::Client, base: &str, body: Value) -> Value {
    let (status, count) = post_as(http, base, "sk-local", "/v1/responses/input_tokens", &body).await;
    assert_eq!(status, 200, "{count}");
    assert_eq!(count["object"], "response.input_tokens", "{count}");
    let response = create(http, base, body.clone()).await;
    assert_eq!(count["input_tokens"], response["usage"]["input_tokens"], "{body}");
    assert!(count["input_tokens"].as_u64().unwrap() > 0);
    response
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_tokens_is_the_next_creates_usage() {
    let cluster = Cluster::builder().workers(2).shards(1).start().await;
    let http = reqwest::Client::new();
    let base = cluster.url();

    count_then_create(&http, &base, json!({"input": "What is the capital of France?", "instructions": "Be brief."}))
        .await;
    let items = json!([
        {"role": "developer", "content": "You fix builds."},
        {"role": "user", "content": [{"type": "input_text", "text": "Fix the build."}]},
        {"type": "function_call", "call_id": "call_1", "name": "run_tests", "arguments": "{\"path\":\".\",\"verbose\":true}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "3 failed"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Three failed.", "annotations": []}]},
        {"role": "user", "content": "Which ones?"}
    ]);
    let head = count_then_create(&http, &base, json!({"input": items, "tools": [run_tests_tool()]})).await;
    // With previous_response_id: the chain's tokens count too (its owner renders the rest).
    let next = count_then_create(
        &http,
        &base,
        json!({"previous_response_id": head["id"], "input": "Go on.", "tools": [run_tests_tool()]}),
    )
    .await;
    // A changed header renders the chain from scratch: still the same count.
    count_then_create(
        &http,
        &base,
        json!({"previous_response_id": next["id"], "input": "More.", "instructions": "New."}),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_tokens_refuses_what_a_create_refuses_with_the_same_error() {
    let cluster = Cluster::builder().workers(2).shards(1).start().await;
    let http = reqwest::Client::new();
    let base = cluster.url();
    for body in [
        json!({"input": "x", "tool_choice": {"type": "function", "name": "nope"}}),
        json!({"input": [{"type": "web_search_call"}]}),
        json!({"input": "x", "previous_response_id": "resp_0123456789abcdef0123456789abcdef0123456789abcdef"}),
        json!({"input": "x", "previous_response_id": "nope"}),
        json!({"input": "x", "model": "gpt-nope"}),
        json!({}),
    ] {
        let (count_status, count) = post_as(&http, &base, "sk-local", "/v1/responses/input_tokens", &body).await;
        let (create_status, created) = post_as(&http, &base, "sk-local", "/v1/responses", &body).await;
        assert!(count_status >= 400, "{body}: {count}");
        assert_eq!((count_status, &count), (create_status, &created), "{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counting_charges_no_prefill_budget() {
    // One token a second and a burst of 40: nothing refills while the test runs.
    let cluster = Cluster::builder()
        .workers(1)
        .shards(1)
        .worker_config(|c| c.prefill_limit = tether_worker::budget::PrefillLimit { tokens_per_second: 1, burst: 40 })
        .start()
        .await;
    let http = reqwest::Client::new();
    let base = cluster.url();
    let body = json!({"input": "tok ".repeat(10)});
    let mut counted = 0;
    for _ in 0..10 {
        let (status, count) = post_as(&http, &base, "sk-local", "/v1/responses/input_tokens", &body).await;
        assert_eq!(status, 200, "{count}");
        counted += count["input_tokens"].as_u64().unwrap();
    }
    assert!(counted > 40, "the counts add up to more than the budget: {counted}");
    // The budget is whole: the create it was counting for still runs.
    create(&http, &base, body).await;
}
