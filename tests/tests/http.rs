//! The HTTP surface (JSON, SSE, retrieve, delete) and routing across edges.

use serde_json::{Value, json};
use tether_proto::shard::v1::DropSessionRequest;
use tether_proto::shard::v1::shard_client::ShardClient;
use tether_tests::Cluster;
use tether_tests::client::{cached_tokens, function_calls, output_text, run_tests_tool};

async fn post(client: &reqwest::Client, base: &str, body: Value) -> (u16, Value) {
    let reply = client.post(format!("{base}/v1/responses")).bearer_auth("sk-local").json(&body).send().await.unwrap();
    let status = reply.status().as_u16();
    (status, reply.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_create_retrieve_delete() {
    let cluster = Cluster::builder().start().await;
    let http = reqwest::Client::new();
    let reply = http
        .post(format!("{}/v1/responses", cluster.url()))
        .json(&json!({"model": "tether-sim", "input": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 200);
    assert!(reply.headers().get("x-request-id").is_some());
    let response: Value = reply.json().await.unwrap();
    assert_eq!(response["object"], "response");
    assert_eq!(response["status"], "completed");
    assert!(!output_text(&response).is_empty());
    assert_eq!(
        response["usage"]["total_tokens"],
        response["usage"]["input_tokens"].as_u64().unwrap() + response["usage"]["output_tokens"].as_u64().unwrap()
    );
    let id = response["id"].as_str().unwrap();

    let fetched: Value =
        http.get(format!("{}/v1/responses/{id}", cluster.url())).send().await.unwrap().json().await.unwrap();
    assert_eq!(fetched["id"], id);
    assert_eq!(fetched["output"], response["output"]);
    let deleted: Value =
        http.delete(format!("{}/v1/responses/{id}", cluster.url())).send().await.unwrap().json().await.unwrap();
    assert_eq!(deleted, json!({"id": id, "object": "response.deleted", "deleted": true}));
    let gone = http.get(format!("{}/v1/responses/{id}", cluster.url())).send().await.unwrap();
    assert_eq!(gone.status(), 404);
    let body: Value = gone.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    let (status, body) = post(&http, &cluster.url(), json!({"input": "more", "previous_response_id": id})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("previous_response_not_found")),
        "deleted state is gone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_stream_is_framed_per_event_and_ends_on_the_terminal() {
    let cluster = Cluster::builder().start().await;
    let http = reqwest::Client::new();
    let reply = http
        .post(format!("{}/v1/responses", cluster.url()))
        .header("accept", "application/json")
        .json(&json!({"input": "stream please", "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.headers()["content-type"], "text/event-stream");
    let text = reply.text().await.unwrap();
    let frames: Vec<&str> = text.split("\n\n").filter(|f| !f.is_empty()).collect();
    let mut last = Value::Null;
    for (index, frame) in frames.iter().enumerate() {
        let (event_line, data_line) = frame.split_once('\n').expect("event and data lines");
        let data: Value = serde_json::from_str(data_line.strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(event_line.strip_prefix("event: ").unwrap(), data["type"]);
        assert_eq!(data["sequence_number"], index);
        assert!(data.get("error").is_none_or(Value::is_null));
        last = data;
    }
    assert_eq!(last["type"], "response.completed");
    assert!(!text.contains("[DONE]"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_protocol_errors() {
    let cluster = Cluster::builder()
        .workers(1)
        .shards(1)
        .edge_config(|c| {
            c.auth = tether_edge::config::AuthMode::Keys;
            c.api_keys = [("sk-local".to_owned(), "t".to_owned())].into();
            c.max_message_bytes = 2048;
        })
        .start()
        .await;
    let http = reqwest::Client::new();
    let url = format!("{}/v1/responses", cluster.url());
    let anonymous = http.post(&url).json(&json!({"input": "x"})).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (http.post(&url).bearer_auth("sk-local").body("{not json"), 400, "invalid_json"),
        (http.post(&url).bearer_auth("sk-local").json(&json!({"input": "x".repeat(5000)})), 413, "request_too_large"),
        (http.post(&url).bearer_auth("sk-local").json(&json!({"input": 5})), 400, "invalid_request"),
        (
            http.post(&url).bearer_auth("sk-local").json(&json!({"input": "x", "model": "gpt-nope"})),
            400,
            "model_not_found",
        ),
        (http.get(&url).bearer_auth("sk-local"), 400, "invalid_request"),
        (http.get(format!("{url}/resp_123")).bearer_auth("sk-local"), 404, "not_found"),
    ];
    for (request, status, code) in cases {
        let reply = request.send().await.unwrap();
        assert_eq!(reply.status().as_u16(), status, "{code}");
        let body: Value = reply.json().await.unwrap();
        assert_eq!(body["error"]["code"], code);
        assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let (status, _) = post(&http, &cluster.url(), json!({"input": "still served"})).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_edge_routes_any_response_id() {
    let cluster = Cluster::builder().edges(2).start().await;
    let http = reqwest::Client::new();
    let (first, second) = (cluster.edges[0].url(), cluster.edges[1].url());
    let (status, response) = post(
        &http,
        &first,
        json!({"input": "start on edge 0", "tools": [run_tests_tool()], "tool_choice": "required"}),
    )
    .await;
    assert_eq!(status, 200);
    let call = function_calls(&response)[0].clone();
    let (status, next) = post(
        &http,
        &second,
        json!({"previous_response_id": response["id"], "input": [{"type": "function_call_output", "call_id": call["call_id"], "output": "ok"}]}),
    )
    .await;
    assert_eq!(status, 200, "{next}");
    assert!(cached_tokens(&next) > 0, "the chain stayed on its worker and shard");
    assert_eq!(next["x_tether"]["worker"], response["x_tether"]["worker"], "lineage routing without a lookup table");
    let fetched = http.get(format!("{second}/v1/responses/{}", response["id"].as_str().unwrap())).send().await.unwrap();
    assert_eq!(fetched.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stateless_full_history_still_hits_the_shard_prefix_cache() {
    let cluster = Cluster::builder().start().await;
    let http = reqwest::Client::new();
    let mut history = vec![json!({"role": "user", "content": "Run the tests and tell me what failed."})];
    let body = |history: &Vec<Value>| {
        json!({"input": history, "store": false, "prompt_cache_key": "agent-7", "tools": [run_tests_tool()],
               "metadata": {"tether_sim_tool_calls": "2"}})
    };
    let (_, first) = post(&http, &cluster.url(), body(&history)).await;
    assert_eq!(cached_tokens(&first), 0);
    for item in first["output"].as_array().unwrap() {
        history.push(item.clone());
    }
    let call = function_calls(&first)[0].clone();
    history.push(json!({"type": "function_call_output", "call_id": call["call_id"], "output": "2 failed"}));
    let (status, second) = post(&http, &cluster.url(), body(&history)).await;
    assert_eq!(status, 200, "{second}");
    assert!(cached_tokens(&second) > 0, "the re-rendered history matches the shard's cached prefix");
    assert!(cached_tokens(&second) >= first["usage"]["input_tokens"].as_u64().unwrap());
    let (status, body) = post(&http, &cluster.url(), json!({"previous_response_id": second["id"], "input": "x"})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("previous_response_not_found")),
        "store=false over HTTP keeps nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_that_lost_the_session_gets_the_full_prompt_once() {
    let cluster = Cluster::builder().start().await;
    let http = reqwest::Client::new();
    let (_, first) = post(&http, &cluster.url(), json!({"input": "remember this"})).await;
    for shard in &cluster.shards {
        let mut client = ShardClient::connect(shard.url()).await.unwrap();
        client.drop_session(DropSessionRequest { session: 0 }).await.unwrap();
    }
    // Drop the session the chain lives on, whichever shard holds it.
    let key = u64::from_str_radix(&first["id"].as_str().unwrap()[5..21], 16).unwrap();
    let mut dropped = false;
    for shard in &cluster.shards {
        let mut client = ShardClient::connect(shard.url()).await.unwrap();
        dropped |= client.drop_session(DropSessionRequest { session: key }).await.unwrap().into_inner().dropped;
    }
    assert!(dropped, "some shard held the session");
    let (status, next) =
        post(&http, &cluster.url(), json!({"previous_response_id": first["id"], "input": "and now?"})).await;
    assert_eq!(status, 200, "{next}");
    // The claim missed and the worker resent the whole prompt: the session's own prefix is gone
    // (it would cover the first turn's prompt and answer), and what is cached is only what the
    // sim shard's content index holds of it, in whole 16-token blocks.
    let held = first["usage"]["total_tokens"].as_u64().unwrap();
    let cached = cached_tokens(&next);
    assert!(cached < held && cached.is_multiple_of(16), "{cached} cached after the drop, {held} held before");
    assert!(next["usage"]["input_tokens"].as_u64().unwrap() > first["usage"]["input_tokens"].as_u64().unwrap());
    let (_, third) = post(&http, &cluster.url(), json!({"previous_response_id": next["id"], "input": "again"})).await;
    assert!(cached_tokens(&third) > 0, "the resend rebuilt the shard's cache");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicted_parent_is_an_explicit_not_found() {
    let cluster = Cluster::builder().workers(1).worker_config(|c| c.cache.max_entries = 2).start().await;
    let http = reqwest::Client::new();
    let (_, oldest) = post(&http, &cluster.url(), json!({"input": "one"})).await;
    for input in ["two", "three"] {
        let (status, _) = post(&http, &cluster.url(), json!({"input": input})).await;
        assert_eq!(status, 200);
    }
    let (status, body) = post(&http, &cluster.url(), json!({"previous_response_id": oldest["id"], "input": "x"})).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "previous_response_not_found");
    assert_eq!(body["error"]["param"], "previous_response_id");
}
