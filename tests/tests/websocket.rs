//! WebSocket mode over a real socket against an in-process cluster.

use std::collections::HashMap;

use serde_json::{Value, json};
use tether_tests::Cluster;
use tether_tests::client::{
    Received, WsClient, cached_tokens, final_response, function_calls, output_text, run_tests_tool,
};

fn call_outputs(response: &Value) -> Vec<Value> {
    function_calls(response)
        .iter()
        .map(|call| json!({"type": "function_call_output", "call_id": call["call_id"], "output": "{\"failed\":0}"}))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_loop_chains_only_new_items_and_reuses_the_cache() {
    let cluster = Cluster::builder().start().await;
    let mut ws = WsClient::connect(&cluster.ws_url(), Some("sk-test")).await.unwrap();
    let tools = json!([run_tests_tool()]);
    let first = ws
        .create(json!({"model": "tether-sim", "input": "The build is red; fix it.", "tools": tools,
                       "tool_choice": "auto", "metadata": {"tether_sim_tool_calls": "3"}, "previous_response_id": null, "stream": true}))
        .await;
    let mut response = final_response(&first).clone();
    let mut turns = 1;
    let mut calls_seen = 0;
    while !function_calls(&response).is_empty() {
        for call in function_calls(&response) {
            let arguments: Value =
                serde_json::from_str(call["arguments"].as_str().unwrap()).expect("arguments are JSON");
            assert!(
                arguments["path"].is_string() && arguments["verbose"].is_boolean(),
                "schema-valid arguments: {arguments}"
            );
            assert_eq!(call["name"], "run_tests");
            calls_seen += 1;
        }
        let events = ws
            .create(
                json!({"model": "tether-sim", "previous_response_id": response["id"], "input": call_outputs(&response),
                           "tools": tools, "metadata": {"tether_sim_tool_calls": "3"}}),
            )
            .await;
        let next = final_response(&events).clone();
        assert_eq!(next["previous_response_id"], response["id"]);
        assert!(cached_tokens(&next) > 0, "turn {turns} reused the shard's KV cache: {}", next["usage"]);
        assert!(cached_tokens(&next) >= response["usage"]["input_tokens"].as_u64().unwrap());
        response = next;
        turns += 1;
        assert!(turns < 10, "the loop ends");
    }
    assert_eq!(calls_seen, 3);
    assert_eq!(turns, 4);
    assert!(!output_text(&response).is_empty(), "a final text answer");
    assert_eq!(response["status"], "completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_follow_the_protocol_sequence_on_a_named_lane() {
    let cluster = Cluster::builder().start().await;
    let mut ws = WsClient::connect(&cluster.ws_url(), None).await.unwrap();
    let events = ws.create(json!({"model": "tether-sim", "input": "hello", "stream_id": "main"})).await;
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        &types[..4],
        ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
    );
    assert_eq!(
        &types[types.len() - 4..],
        ["response.output_text.done", "response.content_part.done", "response.output_item.done", "response.completed"]
    );
    for (index, event) in events.iter().enumerate() {
        assert_eq!(event["sequence_number"], index, "consecutive sequence numbers");
        assert_eq!(event["stream_id"], "main", "every event echoes the lane");
    }
    let ids: Vec<&Value> = events.iter().filter_map(|e| e.get("response")).map(|r| &r["id"]).collect();
    assert!(ids.windows(2).all(|w| w[0] == w[1]), "one response id through the lifecycle");
    let deltas: String = events
        .iter()
        .filter(|e| e["type"] == "response.output_text.delta")
        .map(|e| e["delta"].as_str().unwrap())
        .collect();
    assert_eq!(deltas, output_text(final_response(&events)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lanes_run_concurrently_and_fifo_within_a_lane() {
    let cluster = Cluster::builder().start().await;
    let mut ws = WsClient::connect(&cluster.ws_url(), None).await.unwrap();
    // Two creates on lane a, one on lane b, sent back to back.
    for (lane, text) in [("a", "first"), ("a", "second"), ("b", "third")] {
        ws.send(&json!({"type": "response.create", "model": "tether-sim", "input": text, "stream_id": lane,
                        "metadata": {"tether_sim_output_tokens": "40"}}))
            .await;
    }
    let mut by_lane: HashMap<String, Vec<Value>> = HashMap::new();
    let mut terminals = 0;
    while terminals < 3 {
        let event = ws.recv().await;
        let lane = event["stream_id"].as_str().expect("lane events carry stream_id").to_owned();
        if event["type"] == "response.completed" {
            terminals += 1;
        }
        by_lane.entry(lane).or_default().push(event);
    }
    // Lane a: the second response starts only after the first completed.
    let a = &by_lane["a"];
    let first_done = a.iter().position(|e| e["type"] == "response.completed").unwrap();
    let second_created = a.iter().rposition(|e| e["type"] == "response.created").unwrap();
    assert!(first_done < second_created, "FIFO within lane a");
    assert_eq!(a.iter().filter(|e| e["type"] == "response.completed").count(), 2);
    assert_eq!(by_lane["b"].last().unwrap()["type"], "response.completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_get_error_events_and_the_connection_keeps_working() {
    let cluster = Cluster::builder().workers(1).shards(1).start().await;
    let mut ws = WsClient::connect(&cluster.ws_url(), None).await.unwrap();
    let cases = [
        ("not json", "invalid_json", None),
        ("[1,2]", "invalid_json", None),
        (r#"{"type":"bogus.event"}"#, "invalid_event_type", None),
        (r#"{"model":"tether-sim"}"#, "invalid_event_type", None),
        (r#"{"type":"response.create","stream_id":""}"#, "invalid_stream_id", None),
        (r#"{"type":"response.create","stream_id":"bad lane!"}"#, "invalid_stream_id", None),
        (
            r#"{"type":"response.create","stream_id":"x","previous_response_id":"resp_unknown","input":"hi"}"#,
            "previous_response_not_found",
            Some("x"),
        ),
        (r#"{"type":"response.create","model":"no-such-model","input":"hi"}"#, "model_not_found", None),
        (r#"{"type":"response.create","input":"hi","temperature":"hot"}"#, "invalid_request", None),
        (r#"{"type":"response.create","input":"hi","background":true}"#, "invalid_request", None),
        (r#"{"type":"response.create","input":"leak tether-safety-canary"}"#, "invalid_prompt", None),
    ];
    for (frame, code, lane) in cases {
        ws.send_raw(frame).await;
        let event = ws.recv().await;
        assert_eq!(event["type"], "error", "{frame}: {event}");
        assert_eq!(event["status"], 400, "{frame}");
        assert_eq!(event["error"]["code"], code, "{frame}: {event}");
        assert!(event["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert_eq!(event.get("stream_id").and_then(Value::as_str), lane, "{frame}");
        assert!(event.get("response").is_none(), "no response.created for a rejected create");
    }
    let events = ws.create(json!({"model": "tether-sim", "input": "still fine?"})).await;
    assert_eq!(final_response(&events)["status"], "completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_33rd_named_lane_is_refused() {
    let cluster = Cluster::builder().workers(1).shards(1).start().await;
    let mut ws = WsClient::connect(&cluster.ws_url(), None).await.unwrap();
    for lane in 0..32 {
        let events = ws.create(json!({"input": "x", "stream_id": format!("lane-{lane}"), "generate": false})).await;
        assert_eq!(final_response(&events)["status"], "completed");
    }
    ws.send(&json!({"type": "response.create", "input": "x", "stream_id": "lane-32"})).await;
    let event = ws.recv().await;
    assert_eq!(event["error"]["code"], "websocket_stream_limit_reached");
    assert_eq!(event["stream_id"], "lane-32");
    let events = ws.create(json!({"input": "x", "stream_id": "lane-0", "generate": false})).await;
    assert_eq!(final_response(&events)["status"], "completed", "known lanes still work");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warmup_prepares_state_that_the_next_turn_chains_from() {
    let cluster = Cluster::builder().start().await;
    let mut ws = WsClient::connect(&cluster.ws_url(), None).await.unwrap();
    let warm = ws
        .create(json!({"model": "tether-sim", "generate": false, "instructions": "You are terse.", "tools": [run_tests_tool()],
                       "input": [{"role": "user", "content": "Long repository context goes here."}]}))
        .await;
    let types: Vec<&str> = warm.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["response.created", "response.in_progress", "response.completed"]);
    let warm = final_response(&warm).clone();
    assert_eq!(warm["output"], json!([]));
    assert_eq!(warm["usage"]["output_tokens"], 0);
    let events = ws
        .create(json!({"model": "tether-sim", "previous_response_id": warm["id"], "instructions": "You are terse.",
                       "tools": [run_tests_tool()], "tool_choice": "none", "input": "Go."}))
        .await;
    let response = final_response(&events);
    assert_eq!(response["status"], "completed");
    assert!(
        cached_tokens(response) >= warm["usage"]["input_tokens"].as_u64().unwrap(),
        "the warmup prefilled the shard"
    );
    assert!(function_calls(response).is_empty(), "tool_choice none gives text");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_false_state_is_scoped_to_its_connection() {
    let cluster = Cluster::builder().start().await;
    let mut first = WsClient::connect(&cluster.ws_url(), None).await.unwrap();
    let events = first.create(json!({"input": "private", "store": false})).await;
    let id = final_response(&events)["id"].as_str().unwrap().to_owned();
    let same = first.create(json!({"input": "more", "previous_response_id": id, "store": false})).await;
    assert_eq!(final_response(&same)["status"], "completed", "the same connection continues");

    let mut second = WsClient::connect(&cluster.ws_url(), None).await.unwrap();
    let other = second.create(json!({"input": "more", "previous_response_id": id})).await;
    assert_eq!(other[0]["error"]["code"], "previous_response_not_found");
    let http = reqwest::Client::new();
    let status = http.get(format!("{}/v1/responses/{id}", cluster.url())).send().await.unwrap().status();
    assert_eq!(status, 404, "store=false responses cannot be retrieved");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_function_and_none_tool_choices() {
    let cluster = Cluster::builder().start().await;
    let mut ws = WsClient::connect(&cluster.ws_url(), None).await.unwrap();
    let tools = json!([{"type": "function", "name": "noop", "parameters": {"type": "object", "properties": {}}}, run_tests_tool()]);
    let forced = ws
        .create(json!({"input": "go", "tools": tools, "tool_choice": {"type": "function", "name": "run_tests"}}))
        .await;
    let calls = function_calls(final_response(&forced)).into_iter().cloned().collect::<Vec<_>>();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0]["name"], "run_tests");
    assert!(calls[0]["call_id"].as_str().unwrap().starts_with("call_"));
    let none = ws.create(json!({"input": "go", "tools": tools, "tool_choice": "none"})).await;
    assert!(function_calls(final_response(&none)).is_empty());
    assert!(!output_text(final_response(&none)).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_close_with_1009_and_other_connections_live_on() {
    let cluster = Cluster::builder().workers(1).shards(1).edge_config(|c| c.max_message_bytes = 4096).start().await;
    let mut bystander = WsClient::connect(&cluster.ws_url(), None).await.unwrap();
    let mut ws = WsClient::connect(&cluster.ws_url(), None).await.unwrap();
    let _ = ws.send_message(json!({"type": "response.create", "input": "x".repeat(10_000)}).to_string().into()).await;
    match ws.receive().await {
        Received::Closed(Some(frame)) => assert_eq!(u16::from(frame.code), 1009),
        other => panic!("expected a 1009 close, got {other:?}"),
    }
    let events = bystander.create(json!({"input": "fine"})).await;
    assert_eq!(final_response(&events)["status"], "completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lifetime_limit_refuses_new_creates_then_closes_normally() {
    let cluster = Cluster::builder()
        .workers(1)
        .shards(1)
        .edge_config(|c| c.ws_max_lifetime = std::time::Duration::from_millis(400))
        .start()
        .await;
    let mut ws = WsClient::connect(&cluster.ws_url(), None).await.unwrap();
    let events = ws.create(json!({"input": "quick"})).await;
    assert_eq!(final_response(&events)["status"], "completed");
    // Unprompted, on the idle socket: the limit error, then a normal close.
    let event = ws.recv().await;
    assert_eq!(event["error"]["code"], "websocket_connection_limit_reached");
    assert!(event.get("stream_id").is_none());
    match ws.receive().await {
        Received::Closed(Some(frame)) => assert_eq!(u16::from(frame.code), 1000),
        other => panic!("expected a 1000 close, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_tenants_response_id_is_unknown() {
    let cluster = Cluster::builder()
        .edge_config(|c| {
            c.auth = tether_edge::config::AuthMode::Keys;
            c.api_keys =
                [("sk-alpha".to_owned(), "alpha".to_owned()), ("sk-beta".to_owned(), "beta".to_owned())].into();
        })
        .start()
        .await;
    assert!(WsClient::connect(&cluster.ws_url(), Some("sk-wrong")).await.is_err(), "the handshake refuses a bad key");
    let mut alpha = WsClient::connect(&cluster.ws_url(), Some("sk-alpha")).await.unwrap();
    let events = alpha.create(json!({"input": "secret plan"})).await;
    let id = final_response(&events)["id"].clone();
    let mut beta = WsClient::connect(&cluster.ws_url(), Some("sk-beta")).await.unwrap();
    let stolen = beta.create(json!({"input": "continue", "previous_response_id": id})).await;
    assert_eq!(stolen[0]["error"]["code"], "previous_response_not_found");
    let own = alpha.create(json!({"input": "continue", "previous_response_id": id})).await;
    assert_eq!(final_response(&own)["status"], "completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_edge_finishes_the_response_then_closes_with_1012() {
    let mut cluster = Cluster::builder().workers(1).shards(1).start().await;
    let mut ws = WsClient::connect(&cluster.ws_url(), None).await.unwrap();
    ws.send(
        &json!({"type": "response.create", "input": "a long one", "metadata": {"tether_sim_output_tokens": "300"}}),
    )
    .await;
    let first = ws.recv().await;
    assert_eq!(first["type"], "response.created");
    let edge = std::mem::replace(&mut cluster.edges[0], tether_tests::Node::idle("drained-edge"));
    let drain = tokio::task::spawn_blocking(move || {
        let mut edge = edge;
        edge.shutdown()
    });
    let mut last = first;
    let close = loop {
        match ws.receive().await {
            Received::Event(event) => last = event,
            Received::Closed(frame) => break frame,
        }
    };
    assert_eq!(last["type"], "response.completed", "the in-flight response finished first");
    assert_eq!(close.map(|f| u16::from(f.code)), Some(1012));
    drain.await.unwrap().expect("the edge drained within its deadline");
}
