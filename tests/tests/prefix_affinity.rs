//! A stateless client without `prompt_cache_key` (the whole history every turn, `store:
//! false`) is placed by its leading content: every turn of the conversation lands on the same
//! worker and shard, which hold its prefix, even while that worker is over the load bound that
//! would re-salt a new keyed session away from it.

use std::time::Duration;

use serde_json::{Value, json};
use tether_tests::Cluster;
use tether_tests::client::{cached_tokens, function_calls, run_tests_tool};
use tether_tests::wait::within;

const INSTRUCTIONS: &str = "You fix failing tests.";
const TASK: &str = "Run the tests and fix what fails in the parser module.";

fn body(history: &[Value]) -> Value {
    json!({"instructions": INSTRUCTIONS, "input": history, "store": false, "tools": [run_tests_tool()],
           "metadata": {"tether_sim_tool_calls": "8"}})
}

async fn post(http: &reqwest::Client, base: &str, body: &Value) -> Value {
    let send = http.post(format!("{base}/v1/responses")).json(body).send();
    let reply = within(Duration::from_secs(20), "a response", send).await.expect("post");
    assert_eq!(reply.status(), 200);
    let response: Value = reply.json().await.expect("json");
    assert_eq!(response["status"], "completed", "{response}");
    response
}

fn placement(response: &Value) -> (String, String) {
    let at = |field: &str| response["x_tether"][field].as_str().expect("x_tether").to_owned();
    (at("worker"), at("shard"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyless_stateless_turns_stay_where_their_prefix_lives_under_load() {
    let cluster = Cluster::builder().shards(2).workers(3).start().await;
    let http = reqwest::Client::new();
    let base = cluster.url();

    let mut history = vec![json!({"role": "user", "content": TASK})];
    let first = post(&http, &base, &body(&history)).await;
    let home = placement(&first);
    assert_eq!(cached_tokens(&first), 0, "a cold cache");

    tracing::info!("--- load the home worker: three long streams of the same conversation prefix");
    // Same leading content, so they land on the home worker too; each stays in flight (5,000
    // tokens at the sim's 1,000 tokens/s) and counts against the worker's load at the edge.
    // With nothing elsewhere, the home worker is over the edge's bound (load factor 1.25).
    let mut streams = Vec::new();
    for _ in 0..3 {
        let mut long = body(&[json!({"role": "user", "content": TASK})]);
        long["stream"] = json!(true);
        long["max_output_tokens"] = json!(5000);
        long["metadata"] = json!({"tether_sim_tool_calls": "0", "tether_sim_output_tokens": "5000"});
        let send = http.post(format!("{base}/v1/responses")).json(&long).send();
        let mut reply = within(Duration::from_secs(20), "a long stream starts", send).await.expect("post");
        assert_eq!(reply.status(), 200);
        let event = within(Duration::from_secs(20), "its first event", reply.chunk()).await.expect("chunk");
        assert!(event.is_some_and(|bytes| bytes.starts_with(b"event: response.created")));
        streams.push(reply);
    }

    tracing::info!("--- follow-ups resend the whole history, without a key");
    let mut previous = first;
    for turn in 1..=4 {
        let call = function_calls(&previous).first().map(|call| (*call).clone()).expect("a tool call");
        history.extend(previous["output"].as_array().expect("output").iter().cloned());
        history.push(json!({"type": "function_call_output", "call_id": call["call_id"], "output": "1 failed"}));
        let next = post(&http, &base, &body(&history)).await;
        assert_eq!(placement(&next), home, "turn {turn} went where its prefix lives");
        let input = next["usage"]["input_tokens"].as_u64().expect("input_tokens");
        let held = previous["usage"]["input_tokens"].as_u64().expect("input_tokens");
        assert!(cached_tokens(&next) >= held, "turn {turn} reused the previous prompt: {next}");
        assert!(cached_tokens(&next) < input);
        previous = next;
    }
    drop(streams);
}
