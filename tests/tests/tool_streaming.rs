//! Streamed tool calls: a function call's arguments arrive as the model writes them, over SSE
//! and over WebSocket, and a call cut by `max_output_tokens` is closed consistently.

use std::time::Duration;

use serde_json::{Value, json};
use tether_tests::Cluster;
use tether_tests::client::{WsClient, final_response, function_calls, run_tests_tool};

/// A cluster whose sim writes 100 tokens a second. The sim sends every token that is due
/// as one piece, so a sim running behind its clock (a loaded machine, at the default
/// 1,000 tokens a second) may send a whole call at once; at 10 ms a token it sends one token
/// a piece unless it stalls for most of the call.
async fn cluster() -> Cluster {
    Cluster::builder().shard_config(|config| config.sim.decode_interval = Duration::from_millis(10)).start().await
}

/// A turn the sim answers with one `run_tests` call (a multi-token arguments object).
fn tool_turn(extra: Value) -> Value {
    let mut body = json!({"model": "tether-sim", "input": "The build is red; run the tests.",
                          "tools": [run_tests_tool()], "tool_choice": "required", "stream": true});
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    body
}

/// Reads an SSE reply into its events.
async fn sse_events(base: &str, body: &Value) -> Vec<Value> {
    let reply =
        reqwest::Client::new().post(format!("{base}/v1/responses")).bearer_auth("sk-local").json(body).send().await;
    let text = reply.unwrap().text().await.unwrap();
    text.split("\n\n")
        .filter(|frame| !frame.is_empty())
        .map(|frame| {
            let data = frame.lines().find_map(|line| line.strip_prefix("data: ")).expect("a data line");
            serde_json::from_str(data).unwrap()
        })
        .collect()
}

fn of_type<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|event| event["type"] == kind).collect()
}

/// Asserts that the call streamed: added, then several deltas whose concatenation is the
/// arguments of `.done`, of the done item and of the final response. Returns the arguments.
fn assert_streamed_call(events: &[Value]) -> String {
    for (index, event) in events.iter().enumerate() {
        assert_eq!(event["sequence_number"], index, "consecutive sequence numbers");
    }
    let kinds: Vec<&str> = events.iter().map(|event| event["type"].as_str().unwrap()).collect();
    let added = kinds.iter().position(|kind| *kind == "response.output_item.added").expect("an item");
    assert_eq!(events[added]["item"]["type"], "function_call");
    assert_eq!(events[added]["item"]["arguments"], "");
    let (item_id, output_index) = (&events[added]["item"]["id"], &events[added]["output_index"]);
    let deltas = of_type(events, "response.function_call_arguments.delta");
    assert!(deltas.len() > 1, "a multi-token arguments object streams in several deltas: {kinds:?}");
    let first = kinds.iter().position(|kind| *kind == "response.function_call_arguments.delta").unwrap();
    let done_at = kinds.iter().position(|kind| *kind == "response.function_call_arguments.done").unwrap();
    assert!(added < first && first < done_at, "added, deltas, done: {kinds:?}");
    assert!(
        kinds[first..done_at].iter().all(|kind| *kind == "response.function_call_arguments.delta"),
        "only deltas between the first delta and .done: {kinds:?}"
    );
    for delta in &deltas {
        assert_eq!((&delta["item_id"], &delta["output_index"]), (item_id, output_index));
    }
    let streamed: String = deltas.iter().map(|delta| delta["delta"].as_str().unwrap()).collect();
    let first_delta = deltas[0]["delta"].as_str().unwrap();
    assert!(first_delta.len() < streamed.len(), "the first delta came before the arguments were all generated");
    let done = &events[done_at];
    assert_eq!(done["arguments"], streamed.as_str());
    let item_done = of_type(events, "response.output_item.done")[0];
    assert_eq!(item_done["item"]["arguments"], streamed.as_str());
    assert_eq!(item_done["item"]["status"], "completed");
    let response = final_response(events);
    assert_eq!(response["status"], "completed");
    assert_eq!(function_calls(response)[0]["arguments"], streamed.as_str());
    let arguments: Value = serde_json::from_str(&streamed).expect("the arguments are JSON");
    assert!(arguments["path"].is_string() && arguments["verbose"].is_boolean(), "{arguments}");
    streamed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_turn_streams_its_arguments_over_sse_and_websocket() {
    let cluster = cluster().await;
    let over_sse = sse_events(&cluster.url(), &tool_turn(json!({}))).await;
    let sse_arguments = assert_streamed_call(&over_sse);

    let mut ws = WsClient::connect(&cluster.ws_url(), Some("sk-test")).await.unwrap();
    let over_ws = ws.create(tool_turn(json!({}))).await;
    let ws_arguments = assert_streamed_call(&over_ws);
    assert_eq!(sse_arguments, ws_arguments, "the same prompt, the same call");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_cut_by_max_output_tokens_ends_incomplete() {
    let cluster = cluster().await;
    let whole = sse_events(&cluster.url(), &tool_turn(json!({}))).await;
    let tokens = final_response(&whole)["usage"]["output_tokens"].as_u64().unwrap();
    // Stop well inside the arguments (the call ends with `}}` and `</tool_call>`).
    let events = sse_events(&cluster.url(), &tool_turn(json!({"max_output_tokens": tokens - 8}))).await;
    let kinds: Vec<&str> = events.iter().map(|event| event["type"].as_str().unwrap()).collect();
    assert!(of_type(&events, "response.function_call_arguments.delta").len() > 1, "{kinds:?}");
    let streamed: String = of_type(&events, "response.function_call_arguments.delta")
        .iter()
        .map(|delta| delta["delta"].as_str().unwrap())
        .collect();
    assert_eq!(of_type(&events, "response.function_call_arguments.done")[0]["arguments"], streamed.as_str());
    let item = &of_type(&events, "response.output_item.done")[0]["item"];
    assert_eq!((item["type"].as_str(), item["status"].as_str()), (Some("function_call"), Some("incomplete")));
    assert_eq!(item["arguments"], streamed.as_str());
    assert!(serde_json::from_str::<Value>(&streamed).is_err(), "the cut arguments are unfinished: {streamed}");
    let response = final_response(&events);
    assert_eq!(kinds.last(), Some(&"response.incomplete"));
    assert_eq!(response["incomplete_details"]["reason"], "max_output_tokens");
    assert_eq!(response["output"], json!([item]), "the output holds the closed item only");
    assert!(!serde_json::to_string(&events).unwrap().contains("tool_call>"), "no markup leaks");
}
