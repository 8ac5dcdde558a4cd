//! Issue 11, "bounded everything": every client-controlled size and count that reaches a
//! worker or a shard is capped, refused in the protocol's shape without touching the
//! session's state, and a prompt must fit its model's context window.

use std::time::Duration;

use serde_json::{Value, json};
use tether_proto::shard::v1::InfoRequest;
use tether_proto::shard::v1::shard_client::ShardClient;
use tether_tests::client::{WsClient, cached_tokens};
use tether_tests::{Cluster, wait};

async fn post(client: &reqwest::Client, base: &str, body: Value) -> (u16, Value) {
    let reply = client.post(format!("{base}/v1/responses")).bearer_auth("sk-local").json(&body).send().await.unwrap();
    let status = reply.status().as_u16();
    (status, reply.json().await.unwrap())
}

fn assert_invalid(status: u16, body: &Value, code: &str, param: &str) {
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert_eq!(body["error"]["param"], param, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_11_a_huge_sim_output_hint_is_refused_and_the_process_lives() {
    let cluster = Cluster::builder().workers(1).shards(1).start().await;
    let http = reqwest::Client::new();
    // Before the fix this request aborted the whole process (the sim planned 4 G tokens).
    let body = json!({"model":"tether-sim","input":"x","max_output_tokens":1,
                      "metadata":{"tether_sim_output_tokens":"4294967295"}});
    let (status, reply) = post(&http, &cluster.url(), body).await;
    assert_invalid(status, &reply, "invalid_request", "metadata.tether_sim_output_tokens");
    let (status, reply) =
        post(&http, &cluster.url(), json!({"input":"x","metadata":{"tether_sim_tool_calls":"-1"}})).await;
    assert_invalid(status, &reply, "invalid_request", "metadata.tether_sim_tool_calls");
    // At the cap, the answer is cut by max_output_tokens, generated lazily.
    let body = json!({"input":"x","max_output_tokens":2,"metadata":{"tether_sim_output_tokens":"65536"}});
    let (status, reply) = post(&http, &cluster.url(), body).await;
    assert_eq!((status, reply["status"].as_str()), (200, Some("incomplete")), "{reply}");
    assert_eq!(reply["usage"]["output_tokens"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_limit_requests_are_refused_over_http_and_websocket_and_the_state_is_untouched() {
    let cluster = Cluster::builder().workers(1).shards(1).start().await;
    let http = reqwest::Client::new();
    let (status, parent) = post(&http, &cluster.url(), json!({"input": "remember this"})).await;
    assert_eq!(status, 200, "{parent}");
    let id = parent["id"].clone();
    let pairs: serde_json::Map<String, Value> = (0..17).map(|i| (format!("k{i}"), json!("v"))).collect();
    let items: Vec<Value> = (0..2049).map(|_| json!({"role":"user","content":"x"})).collect();
    let tools: Vec<Value> =
        (0..129).map(|i| json!({"type":"function","name": format!("f{i}"),"parameters":{"type":"object"}})).collect();
    let cases = [
        (json!({"metadata": pairs}), "metadata"),
        (json!({"metadata": {"note": "v".repeat(513)}}), "metadata.note"),
        (json!({"input": items}), "input"),
        (json!({"tools": tools}), "tools"),
        (json!({"max_output_tokens": 131_073}), "max_output_tokens"),
        (json!({"instructions": "i".repeat(256 * 1024 + 1)}), "instructions"),
    ];
    let mut ws = WsClient::connect(&cluster.ws_url(), Some("sk-local")).await.unwrap();
    for (fields, param) in &cases {
        let mut body = json!({"previous_response_id": id, "input": "more"});
        body.as_object_mut().unwrap().extend(fields.as_object().unwrap().clone());
        let (status, reply) = post(&http, &cluster.url(), body.clone()).await;
        assert_invalid(status, &reply, "invalid_request", param);
        let events = ws.create(body).await;
        assert_eq!(events.len(), 1, "only an error event: {events:?}");
        assert_eq!(events[0]["type"], "error");
        assert_eq!(events[0]["error"]["param"], *param, "{}", events[0]);
        assert_eq!(events[0]["error"]["type"], "invalid_request_error", "{}", events[0]);
    }
    // The parent is still there, unchanged, and its cache still hits.
    let (status, next) = post(&http, &cluster.url(), json!({"previous_response_id": id, "input": "and now?"})).await;
    assert_eq!(status, 200, "{next}");
    assert!(cached_tokens(&next) >= parent["usage"]["input_tokens"].as_u64().unwrap(), "{next}");
}

/// Posts `body` until the worker has learned the shards' window and refuses it (a request
/// sent before the shard described itself reaches the shard, which refuses it too).
async fn refused_for_the_window(http: &reqwest::Client, base: &str, body: Value) -> Value {
    wait::until(Duration::from_secs(10), "the worker refuses a prompt past the window", || {
        let body = body.clone();
        async move {
            let (status, reply) = post(http, base, body).await;
            (status == 400 && reply["error"]["code"] == "context_length_exceeded").then_some(reply)
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_past_the_context_window_is_refused_before_the_shard_works() {
    let cluster = Cluster::builder().workers(1).shards(1).shard_config(|c| c.sim.context_window = 300).start().await;
    let http = reqwest::Client::new();
    let long = "tok ".repeat(400);
    let reply = refused_for_the_window(&http, &cluster.url(), json!({"input": long})).await;
    assert_invalid(400, &reply, "context_length_exceeded", "input");
    // The prompt fits but not with the output it asks for.
    let (status, reply) =
        post(&http, &cluster.url(), json!({"input": "tok ".repeat(200), "max_output_tokens": 200})).await;
    assert_invalid(status, &reply, "context_length_exceeded", "input");
    let mut shard = ShardClient::connect(cluster.shards[0].url()).await.unwrap();
    let info = shard.info(InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.context_window, 300);
    assert_eq!(info.cache_tokens, 0, "the shard prefilled nothing");
    let (status, reply) = post(&http, &cluster.url(), json!({"input": "tok ".repeat(200)})).await;
    assert_eq!(status, 200, "a prompt that fits is served: {reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncation_auto_drops_the_oldest_items_and_disabled_refuses() {
    let cluster = Cluster::builder().workers(1).shards(1).shard_config(|c| c.sim.context_window = 400).start().await;
    let http = reqwest::Client::new();
    let turn = |text: &str| json!({"input": text.repeat(120), "max_output_tokens": 8, "instructions": "Be brief."});
    let (status, first) = post(&http, &cluster.url(), turn("alpha ")).await;
    assert_eq!(status, 200, "{first}");
    let (status, second) = post(&http, &cluster.url(), {
        let mut body = turn("beta ");
        body["previous_response_id"] = first["id"].clone();
        body
    })
    .await;
    assert_eq!(status, 200, "{second}");
    // A third long turn does not fit: refused by default...
    let mut third = turn("gamma ");
    third["previous_response_id"] = second["id"].clone();
    let reply = refused_for_the_window(&http, &cluster.url(), third.clone()).await;
    assert_invalid(400, &reply, "context_length_exceeded", "input");
    // ...and served with truncation "auto", the oldest items left out.
    third["truncation"] = json!("auto");
    let (status, reply) = post(&http, &cluster.url(), third).await;
    assert_eq!(status, 200, "{reply}");
    let input_tokens = reply["usage"]["input_tokens"].as_u64().unwrap();
    assert!(input_tokens + 8 <= 400, "the prompt fits the window: {input_tokens}");
    assert!(input_tokens > 240, "only the oldest items were dropped: {input_tokens}");
    assert_eq!(reply["truncation"], "auto");
    // The truncated chain goes on.
    let (status, fourth) = post(
        &http,
        &cluster.url(),
        json!({"previous_response_id": reply["id"], "input": "ok", "max_output_tokens": 8, "instructions": "Be brief."}),
    )
    .await;
    assert_eq!(status, 200, "{fourth}");
    assert!(cached_tokens(&fourth) > 0, "the truncated prompt is the shard's cached prefix: {fourth}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_past_its_prefill_budget_gets_429_and_other_tenants_do_not() {
    let cluster = Cluster::builder()
        .workers(1)
        .shards(1)
        .edge_config(|c| {
            c.auth = tether_edge::config::AuthMode::Keys;
            c.api_keys =
                [("sk-alpha".to_owned(), "alpha".to_owned()), ("sk-beta".to_owned(), "beta".to_owned())].into();
        })
        // One token a second: nothing refills while the test runs.
        .worker_config(|c| c.prefill_limit = tether_worker::budget::PrefillLimit { tokens_per_second: 1, burst: 50 })
        .start()
        .await;
    let http = reqwest::Client::new();
    let send = |key: &'static str, body: Value| {
        let request = http.post(format!("{}/v1/responses", cluster.url())).bearer_auth(key).json(&body);
        async move {
            let reply = request.send().await.unwrap();
            (reply.status().as_u16(), reply.json::<Value>().await.unwrap())
        }
    };
    let (status, first) = send("sk-alpha", json!({"input": "tok ".repeat(100)})).await;
    assert_eq!(status, 200, "the first turn fits the burst: {first}");
    let (status, refused) = send("sk-alpha", json!({"input": "more", "previous_response_id": first["id"]})).await;
    assert_eq!(status, 429, "{refused}");
    assert_eq!(refused["error"]["type"], "rate_limit_error", "{refused}");
    assert_eq!(refused["error"]["code"], "rate_limit_exceeded", "{refused}");
    let (status, other) = send("sk-beta", json!({"input": "hello"})).await;
    assert_eq!(status, 200, "another tenant has its own budget: {other}");
}
