//! Structured outputs and tool-argument schemas through the whole cluster: a `text.format`
//! json_schema turn answers with JSON that validates against the schema (a Pydantic model's
//! `$defs`/`$ref` schema), json_object answers with an object, a function whose parameters
//! are a nested model gets arguments that validate, a cut JSON answer is incomplete, and a
//! malformed `text.format` is a 400 naming its `param`.

use std::time::Duration;

use serde_json::{Value, json};
use tether_tests::Cluster;
use tether_tests::client::{function_calls, output_text};
use tether_tests::wait::until;

fn fixture(name: &str) -> Value {
    let path = format!("{}/../services/shard/tests/fixtures/schemas/{name}.json", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn validator(schema: &Value) -> jsonschema::Validator {
    jsonschema::options().should_validate_formats(true).build(schema).unwrap()
}

async fn post(http: &reqwest::Client, base: &str, body: Value) -> (u16, Value) {
    let reply = http.post(format!("{base}/v1/responses")).bearer_auth("sk-local").json(&body).send().await.unwrap();
    let status = reply.status().as_u16();
    (status, reply.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_schema_turn_answers_with_json_that_validates() {
    let cluster = Cluster::builder().workers(1).shards(1).start().await;
    let http = reqwest::Client::new();
    for (name, strict) in
        [("openai_strict_person", true), ("pydantic_constrained_order", false), ("zod_root_recursion", true)]
    {
        let schema = fixture(name);
        let check = validator(&schema);
        for input in ["describe someone", "another one", "and a third"] {
            let format = json!({"type": "json_schema", "name": "answer", "schema": schema, "strict": strict});
            let (status, response) =
                post(&http, &cluster.url(), json!({"input": input, "text": {"format": format}})).await;
            assert_eq!(status, 200, "{response}");
            assert_eq!(response["status"], "completed", "{response}");
            assert_eq!(response["text"]["format"], format, "text is echoed as sent");
            let text = output_text(&response);
            let value: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: not JSON ({e}): {text}"));
            let errors: Vec<String> = check.iter_errors(&value).map(|e| e.to_string()).collect();
            assert!(errors.is_empty(), "{name}: {value}: {errors:?}");
        }
    }

    let (status, response) =
        post(&http, &cluster.url(), json!({"input": "hi", "text": {"format": {"type": "json_object"}}})).await;
    assert_eq!(status, 200, "{response}");
    assert!(serde_json::from_str::<Value>(&output_text(&response)).unwrap().is_object(), "{response}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_json_answer_is_incomplete() {
    let cluster = Cluster::builder().workers(1).shards(1).start().await;
    let http = reqwest::Client::new();
    let format = json!({"type": "json_schema", "name": "order", "schema": fixture("pydantic_constrained_order")});
    let body = json!({"input": "order", "text": {"format": format}, "max_output_tokens": 16});
    let (status, response) = post(&http, &cluster.url(), body).await;
    assert_eq!(status, 200, "{response}");
    assert_eq!(response["status"], "incomplete", "{response}");
    assert_eq!(response["incomplete_details"]["reason"], "max_output_tokens", "{response}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_taking_a_nested_model_gets_arguments_that_validate() {
    let cluster = Cluster::builder().workers(1).shards(1).start().await;
    let http = reqwest::Client::new();
    for (name, strict) in
        [("pydantic_nested_person", false), ("openai_strict_ticket", true), ("zod_definitions_refs", false)]
    {
        let schema = fixture(name);
        let check = validator(&schema);
        let tool = json!({"type": "function", "name": "submit", "parameters": schema, "strict": strict});
        for input in ["file it", "once more"] {
            let body = json!({"input": input, "tools": [tool], "tool_choice": "required"});
            let (status, response) = post(&http, &cluster.url(), body).await;
            assert_eq!(status, 200, "{response}");
            let calls = function_calls(&response);
            assert_eq!(calls.len(), 1, "{response}");
            let arguments: Value = serde_json::from_str(calls[0]["arguments"].as_str().unwrap()).unwrap();
            assert!(arguments.is_object(), "{name}: an object where the schema has one: {arguments}");
            let errors: Vec<String> = check.iter_errors(&arguments).map(|e| e.to_string()).collect();
            assert!(errors.is_empty(), "{name}: {arguments}: {errors:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_that_cannot_constrain_output_refuses_json_formats() {
    // The sim with structured outputs off stands in for the llama engine: its shard says so
    // in `Info`, and the worker refuses JSON formats before any engine work.
    let cluster =
        Cluster::builder().workers(1).shards(1).shard_config(|c| c.sim.structured_outputs = false).start().await;
    let http = reqwest::Client::new();
    let schema = json!({"type": "object", "properties": {"a": {"type": "string"}}});
    // The worker learns the shard's capabilities from the same `Info` that lists its models.
    until(Duration::from_secs(10), "the shard's Info reaches the worker", || async {
        let list: Value = http
            .get(format!("{}/v1/models", cluster.url()))
            .bearer_auth("sk-local")
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        list["data"].as_array().is_some_and(|models| !models.is_empty()).then_some(())
    })
    .await;
    for format in [json!({"type": "json_object"}), json!({"type": "json_schema", "name": "a", "schema": schema})] {
        let (status, body) = post(&http, &cluster.url(), json!({"input": "hi", "text": {"format": format}})).await;
        assert_eq!(status, 400, "{format}: {body}");
        assert_eq!(body["error"]["param"], "text.format", "{body}");
    }
    let (status, body) =
        post(&http, &cluster.url(), json!({"input": "hi", "text": {"format": {"type": "text"}}})).await;
    assert_eq!(status, 200, "plain text is still served: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_text_format_is_a_400_naming_its_param() {
    let cluster = Cluster::builder().workers(1).shards(1).start().await;
    let http = reqwest::Client::new();
    let schema = json!({"type": "object", "properties": {"a": {"type": "string"}}});
    for (text, param) in [
        (json!({"format": {"type": "xml"}}), "text.format.type"),
        (json!({"format": {"type": "json_schema", "schema": schema}}), "text.format.name"),
        (json!({"format": {"type": "json_schema", "name": "a b", "schema": schema}}), "text.format.name"),
        (json!({"format": {"type": "json_schema", "name": "ok"}}), "text.format.schema"),
        (json!({"format": {"type": "json_schema", "name": "ok", "schema": [1]}}), "text.format.schema"),
        (json!({"format": "json"}), "text.format"),
        (json!({"format": {"type": "json_schema", "name": "ok", "schema": {"type": 12}}}), "text.format.schema"),
    ] {
        let (status, body) = post(&http, &cluster.url(), json!({"input": "hi", "text": text})).await;
        assert_eq!(status, 400, "{text}: {body}");
        assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
        assert_eq!(body["error"]["param"], param, "{text}: {body}");
    }
}
