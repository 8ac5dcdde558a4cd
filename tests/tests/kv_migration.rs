//! A session's KV cache moves with it when its shard is drained: the draining shard hands
//! each session to its owner on the ring without it, so the worker's next turn there claims
//! its prefix and hits. A crashed shard hands off nothing: the next turn starts cold.

use std::time::Duration;

use serde_json::{Value, json};
use tether_tests::Cluster;
use tether_tests::client::cached_tokens;
use tether_tests::wait::within;

async fn post(http: &reqwest::Client, base: &str, body: Value) -> Value {
    let reply =
        within(Duration::from_secs(20), "a response", http.post(format!("{base}/v1/responses")).json(&body).send())
            .await
            .expect("post");
    assert_eq!(reply.status(), 200);
    let response: Value = reply.json().await.expect("json");
    assert_eq!(response["status"], "completed", "{response}");
    response
}

fn shard_of(response: &Value) -> String {
    response["x_tether"]["shard"].as_str().expect("x_tether.shard").to_owned()
}

fn usage(response: &Value, field: &str) -> u64 {
    response["usage"][field].as_u64().unwrap_or_else(|| panic!("usage.{field} in {response}"))
}

/// Starts a chain of two turns; returns its head (the second turn).
async fn two_turns(http: &reqwest::Client, base: &str, name: &str) -> Value {
    let first = post(http, base, json!({"input": format!("session {name}: the first question")})).await;
    let second = post(http, base, json!({"previous_response_id": first["id"], "input": "a follow-up"})).await;
    assert_eq!(shard_of(&second), shard_of(&first), "a session stays on its shard");
    assert!(cached_tokens(&second) > 0, "the follow-up reuses the shard's KV cache: {second}");
    second
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_shard_hands_its_sessions_over_and_a_killed_one_does_not() {
    let mut cluster = Cluster::builder().shards(3).workers(1).start().await;
    let http = reqwest::Client::new();
    let base = cluster.url();

    let head = two_turns(&http, &base, "drained").await;
    let drained = shard_of(&head);
    // What the shard holds for the session: the follow-up's prompt and its answer.
    let held = usage(&head, "input_tokens") + usage(&head, "output_tokens");

    tracing::info!("--- drain {drained}");
    let node = std::mem::replace(cluster.shard(&drained), tether_tests::Node::idle("drained"));
    let drain = tokio::task::spawn_blocking(move || {
        let mut node = node;
        node.shutdown()
    });
    within(Duration::from_secs(10), "the shard drain", drain)
        .await
        .unwrap()
        .expect("the drain finishes within its deadline");

    let next = post(&http, &base, json!({"previous_response_id": head["id"], "input": "after the drain"})).await;
    let new_owner = shard_of(&next);
    assert_ne!(new_owner, drained);
    assert_eq!(
        cached_tokens(&next),
        held,
        "the new owner holds the whole session it was handed (a cold start reports 0): {next}"
    );

    tracing::info!("--- contrast: kill {new_owner} (no drain) under another session");
    let mut head = two_turns(&http, &base, "killed").await;
    for i in 0.. {
        if shard_of(&head) == new_owner {
            break;
        }
        assert!(i < 32, "no session landed on {new_owner}");
        head = two_turns(&http, &base, &format!("killed {i}")).await;
    }
    cluster.shard(&new_owner).kill();
    let next = post(&http, &base, json!({"previous_response_id": head["id"], "input": "after the crash"})).await;
    assert_ne!(shard_of(&next), new_owner);
    assert_eq!(cached_tokens(&next), 0, "a crashed shard hands nothing over: {next}");
}
