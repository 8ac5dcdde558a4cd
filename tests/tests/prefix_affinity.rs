//! A stateless client without `prompt_cache_key` (the whole history every turn, `store:
//! false`) is placed by its leading content: every turn of the conversation lands on the same
//! worker and shard, which hold its prefix, even while that worker is over the load bound that
//! would re-salt a new keyed session away from it. And each turn of such a conversation sends
//! the shard only what is new: the worker claims the previous turn's prompt and output, which
//! the shard holds for the session.

use std::time::Duration;

use serde_json::{Value, json};
use tether_tests::Cluster;
use tether_tests::client::{cached_tokens, function_calls, run_tests_tool};
use tether_tests::scrape::metric_sum;
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

/// The answers and usage of a stateless conversation of `turns` turns (the whole
/// history every turn, with `key` as `prompt_cache_key` or none), and the tokens the worker
/// claimed from the shard instead of sending them, per turn.
async fn stateless_conversation(base: &str, key: Option<&str>, turns: usize) -> (Vec<Value>, Vec<u64>) {
    let http = reqwest::Client::new();
    let with_key = |mut body: Value| {
        if let Some(key) = key {
            body["prompt_cache_key"] = json!(key);
        }
        body
    };
    let claimed = || metric_sum(base, "tether_worker_stateless_claimed_tokens_total");
    let mut history = vec![json!({"role": "user", "content": TASK})];
    let (mut responses, mut claims) = (Vec::new(), Vec::new());
    for _ in 0..turns {
        let before = claimed().await;
        let response = post(&http, base, &with_key(body(&history))).await;
        claims.push((claimed().await - before) as u64);
        let call = function_calls(&response).first().map(|call| (*call).clone()).expect("a tool call");
        history.extend(response["output"].as_array().expect("output").iter().cloned());
        history.push(json!({"type": "function_call_output", "call_id": call["call_id"], "output": "1 failed"}));
        responses.push(response);
    }
    (responses, claims)
}

/// What a response says that must not depend on how its prompt reached the shard.
fn answer(response: &Value) -> Value {
    let calls: Vec<Value> =
        function_calls(response).iter().map(|call| json!([call["name"], call["arguments"]])).collect();
    json!({"calls": calls, "usage": response["usage"]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stateless_turns_send_only_what_is_new_and_answer_the_same() {
    const TURNS: usize = 5;
    for key in [Some("conversation-1"), None] {
        tracing::info!(?key, "--- sending every stateless turn whole");
        let whole =
            Cluster::builder().shards(2).workers(2).worker_config(|c| c.stateless_held_tokens = 0).start().await;
        let (expected, claims) = stateless_conversation(&whole.url(), key, TURNS).await;
        assert!(claims.iter().all(|claimed| *claimed == 0), "{claims:?}");
        drop(whole);

        tracing::info!(?key, "--- claiming what the shard holds");
        let cluster = Cluster::builder().shards(2).workers(2).start().await;
        let (responses, claims) = stateless_conversation(&cluster.url(), key, TURNS).await;
        assert_eq!(claims[0], 0, "nothing held before the first turn");
        for turn in 1..TURNS {
            // The previous turn's whole prompt and output, exactly: none of it was sent again.
            let usage = &responses[turn - 1]["usage"];
            let held = usage["input_tokens"].as_u64().unwrap() + usage["output_tokens"].as_u64().unwrap();
            assert_eq!(claims[turn], held, "turn {turn} claimed the previous turn ({key:?})");
            assert!(cached_tokens(&responses[turn]) >= held, "{}", responses[turn]);
        }
        let answers = |responses: &[Value]| responses.iter().map(answer).collect::<Vec<_>>();
        assert_eq!(answers(&responses), answers(&expected), "the same answers either way ({key:?})");
    }
}
