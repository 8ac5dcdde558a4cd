//! The rest of the Responses API surface that real clients touch (issue 12): tools without a
//! schema, tool calls cut by `max_output_tokens`, `GET /v1/models/{id}`, the endpoints tether
//! does not implement and unmatched paths or methods (all in the protocol's error shape),
//! `retrieve(stream=true)` and image input parts.

use serde_json::{Value, json};
use tether_tests::Cluster;
use tether_tests::client::{function_calls, run_tests_tool};

async fn post(http: &reqwest::Client, base: &str, body: Value) -> (u16, Value) {
    let reply = http.post(format!("{base}/v1/responses")).bearer_auth("sk-local").json(&body).send().await.unwrap();
    let status = reply.status().as_u16();
    (status, reply.json().await.unwrap())
}

/// Asserts that a reply is an error in the protocol's shape and returns its error object.
async fn error_reply(reply: reqwest::Response, status: u16, context: &str) -> Value {
    assert_eq!(reply.status().as_u16(), status, "{context}");
    let content_type = reply.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(content_type.as_deref(), Some("application/json"), "{context}");
    let body: Value = reply.json().await.unwrap_or_else(|e| panic!("{context}: a JSON body: {e}"));
    let error = body["error"].clone();
    assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()), "{context}: {body}");
    assert!(error["type"].is_string(), "{context}: {body}");
    assert!(error.get("param").is_some() && error.get("code").is_some(), "{context}: {body}");
    error
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_without_parameters_gets_json_object_arguments() {
    let cluster = Cluster::builder().workers(1).shards(1).start().await;
    let http = reqwest::Client::new();
    for choice in [json!("required"), json!({"type": "function", "name": "ping"}), json!("auto")] {
        let tools = json!([{"type": "function", "name": "ping", "description": "Pings the service"}]);
        let (status, response) =
            post(&http, &cluster.url(), json!({"input": "ping it", "tools": tools, "tool_choice": choice})).await;
        assert_eq!(status, 200, "{response}");
        let calls = function_calls(&response);
        assert_eq!(calls.len(), 1, "{response}");
        let arguments: Value = serde_json::from_str(calls[0]["arguments"].as_str().unwrap())
            .unwrap_or_else(|e| panic!("arguments are JSON ({e}): {}", calls[0]["arguments"]));
        assert!(arguments.is_object(), "a missing schema means an object: {arguments}");
        // The tool is echoed as given: no schema.
        assert!(response["tools"][0].get("parameters").is_none_or(Value::is_null), "{response}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_call_cut_by_max_output_tokens_is_incomplete_without_markup() {
    let cluster = Cluster::builder().workers(1).shards(1).start().await;
    let http = reqwest::Client::new();
    for max in [1, 4, 12] {
        let body = json!({
            "input": "run them", "tools": [run_tests_tool()], "tool_choice": "required", "max_output_tokens": max,
        });
        let (status, response) = post(&http, &cluster.url(), body.clone()).await;
        assert_eq!(status, 200, "{response}");
        assert_eq!(response["status"], "incomplete", "{response}");
        assert_eq!(response["incomplete_details"]["reason"], "max_output_tokens", "{response}");
        let text = response["output"].to_string();
        assert!(!text.contains("tool_call"), "no internal markup in the output: {text}");
        for item in response["output"].as_array().unwrap() {
            assert_eq!(item["type"], "function_call", "no text made of a cut call: {item}");
            // A call cut after it opened (its arguments had begun streaming) is closed unfinished.
            assert_eq!(item["status"], "incomplete", "{item}");
            assert!(item["arguments"].as_str().unwrap().starts_with('{'), "{item}");
        }

        // The same over SSE: no delta or item carries the markup.
        let mut stream_body = body;
        stream_body["stream"] = json!(true);
        let reply = http
            .post(format!("{}/v1/responses", cluster.url()))
            .bearer_auth("sk-local")
            .json(&stream_body)
            .send()
            .await
            .unwrap();
        let text = reply.text().await.unwrap();
        assert!(!text.contains("<tool") && !text.contains("tool_call>"), "no markup in the events: {text}");
        assert!(!text.contains("response.output_text.delta"), "no text made of a cut call: {text}");
        assert!(text.contains("event: response.incomplete"), "{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_retrieve_answers_a_listed_model_and_404s_an_unknown_one() {
    let cluster = Cluster::builder().workers(1).shards(1).start().await;
    let http = reqwest::Client::new();
    let list: Value = http
        .get(format!("{}/v1/models", cluster.url()))
        .bearer_auth("sk-local")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let listed = &list["data"][0];
    let id = listed["id"].as_str().unwrap();
    let reply = http.get(format!("{}/v1/models/{id}", cluster.url())).bearer_auth("sk-local").send().await.unwrap();
    assert_eq!(reply.status(), 200);
    assert!(reply.headers().get("x-request-id").is_some());
    let model: Value = reply.json().await.unwrap();
    assert_eq!(&model, listed);

    let reply = http.get(format!("{}/v1/models/gpt-nope", cluster.url())).bearer_auth("sk-local").send().await.unwrap();
    let error = error_reply(reply, 404, "unknown model").await;
    assert_eq!(error["code"], "model_not_found");
    assert_eq!(error["type"], "invalid_request_error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unimplemented_endpoints_and_unmatched_routes_answer_protocol_errors() {
    let cluster = Cluster::builder().workers(1).shards(1).start().await;
    let http = reqwest::Client::new();
    let base = cluster.url();
    let body = json!({"model": "tether-sim", "input": "hi"});

    let compact = http.post(format!("{base}/v1/responses/compact")).json(&body).send().await.unwrap();
    let error = error_reply(compact, 501, "compact").await;
    assert_eq!(error["code"], "unsupported_endpoint");

    let cases = [
        (reqwest::Method::GET, "/v1/nope", 404, "not_found"),
        (reqwest::Method::POST, "/v2/responses", 404, "not_found"),
        (reqwest::Method::PUT, "/v1/responses", 405, "method_not_allowed"),
        (reqwest::Method::PATCH, "/v1/responses/resp_123", 405, "method_not_allowed"),
        (reqwest::Method::POST, "/v1/models", 405, "method_not_allowed"),
        (reqwest::Method::DELETE, "/v1/models/tether-sim", 405, "method_not_allowed"),
        (reqwest::Method::GET, "/v1/responses/compact/x/y", 404, "not_found"),
    ];
    for (method, path, status, code) in cases {
        let reply = http.request(method.clone(), format!("{base}{path}")).json(&body).send().await.unwrap();
        let error = error_reply(reply, status, &format!("{method} {path}")).await;
        assert_eq!(error["code"], code, "{method} {path}");
    }
}

/// Splits an SSE body into its events, checking the framing.
fn sse_events(text: &str) -> Vec<Value> {
    text.split("\n\n")
        .filter(|frame| !frame.is_empty())
        .map(|frame| {
            let (event_line, data_line) = frame.split_once('\n').expect("event and data lines");
            let data: Value = serde_json::from_str(data_line.strip_prefix("data: ").unwrap()).unwrap();
            assert_eq!(event_line.strip_prefix("event: ").unwrap(), data["type"]);
            data
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retrieve_with_stream_replays_the_stored_response_as_events() {
    let cluster = Cluster::builder().workers(1).shards(1).start().await;
    let http = reqwest::Client::new();
    let base = cluster.url();
    for body in [
        json!({"input": "hello there"}),
        json!({"input": "run them", "tools": [run_tests_tool()], "tool_choice": "required"}),
        json!({"input": "long", "max_output_tokens": 5}),
    ] {
        let (status, stored) = post(&http, &base, body).await;
        assert_eq!(status, 200, "{stored}");
        let id = stored["id"].as_str().unwrap();
        let reply = http.get(format!("{base}/v1/responses/{id}?stream=true")).send().await.unwrap();
        assert_eq!(reply.status(), 200);
        assert_eq!(reply.headers()["content-type"], "text/event-stream");
        let events = sse_events(&reply.text().await.unwrap());
        for (index, event) in events.iter().enumerate() {
            assert_eq!(event["sequence_number"], index, "{event}");
        }
        assert_eq!(events[0]["type"], "response.created");
        assert_eq!(events[0]["response"]["id"], id);
        let terminal = events.last().unwrap();
        let expected = format!("response.{}", stored["status"].as_str().unwrap());
        assert_eq!(terminal["type"], expected.as_str());
        assert_eq!(terminal["response"], stored, "the terminal event carries the stored response");
        let done: Vec<&Value> =
            events.iter().filter(|e| e["type"] == "response.output_item.done").map(|e| &e["item"]).collect();
        let output: Vec<&Value> = stored["output"].as_array().unwrap().iter().collect();
        assert_eq!(done, output, "each stored item is replayed");
        let text: String = events
            .iter()
            .filter(|e| e["type"] == "response.output_text.delta")
            .map(|e| e["delta"].as_str().unwrap())
            .collect();
        assert_eq!(text, tether_tests::client::output_text(&stored));
    }
    // `stream=false` is the JSON object, an unknown id a 404 error object either way.
    let reply = http.get(format!("{base}/v1/responses/resp_123?stream=true")).send().await.unwrap();
    error_reply(reply, 404, "unknown id, streamed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_part_is_refused_as_unsupported_with_its_param() {
    let cluster = Cluster::builder().workers(1).shards(1).start().await;
    let http = reqwest::Client::new();
    let input = json!([{"role": "user", "content": [
        {"type": "input_text", "text": "what is this?"},
        {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo="},
    ]}]);
    let (status, body) = post(&http, &cluster.url(), json!({"input": input})).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "input[0].content[1]", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("input_image") && message.contains("not supported"), "{message}");
    let input = json!([{"type": "function_call_output", "call_id": "call_1", "output": [
        {"type": "input_file", "file_id": "file_1"},
    ]}]);
    let (status, body) = post(&http, &cluster.url(), json!({"input": input})).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "input[0].output[0]", "{body}");
}

/// Sends one HTTP/1.1 request on `stream` and reads its response: (status, headers, body).
/// The head announces `body`; only its first `sent` bytes are sent.
async fn exchange(stream: &mut tokio::net::TcpStream, head: &str, body: &[u8], sent: usize) -> (u16, String, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(format!("{head}content-length: {}\r\n\r\n", body.len()).as_bytes()).await.unwrap();
    stream.write_all(&body[..sent]).await.unwrap();
    let mut received = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "the connection closed before a response head");
        received.extend_from_slice(&chunk[..n]);
    };
    let headers = String::from_utf8(received[..end].to_vec()).unwrap().to_ascii_lowercase();
    let status = headers[9..12].parse().unwrap();
    let length: usize = headers
        .lines()
        .find_map(|line| line.strip_prefix("content-length: "))
        .unwrap_or_else(|| panic!("a content-length: {headers}"))
        .parse()
        .unwrap();
    let mut rest = received[end + 4..].to_vec();
    while rest.len() < length {
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "the connection closed inside a response body");
        rest.extend_from_slice(&chunk[..n]);
    }
    (status, headers, rest)
}

/// A client that pools connections (a router in front of tether probing `/v1/responses/render`
/// on every request) keeps its connection after an answer to a path tether does not serve,
/// and is told to drop it (`Connection: close`) when an answer leaves the body unread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_that_skip_a_body_keep_or_honestly_close_the_connection() {
    let cluster = Cluster::builder()
        .workers(1)
        .shards(1)
        .edge_config(|c| {
            c.max_message_bytes = 16 * 1024;
            c.body_read_timeout = std::time::Duration::from_secs(2);
        })
        .start()
        .await;
    let addr = cluster.url().trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let body = serde_json::to_vec(&json!({"model": "tether-sim", "input": "x".repeat(48 * 1024)})).unwrap();
    let post = |path: &str| format!("POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n");

    for path in ["/v1/responses/render", "/v1/nope", "/v1/responses/compact"] {
        let (status, headers, _) = exchange(&mut stream, &post(path), &body, body.len()).await;
        assert!([404, 405, 501].contains(&status), "{path}: {status}");
        assert!(!headers.contains("connection: close"), "{path}: {headers}");
    }
    // A handler that answers without reading a small body (a cancel of an unknown response):
    // the rest is read after the answer, and the connection stays open.
    let small = serde_json::to_vec(&json!({"note": "x".repeat(2048)})).unwrap();
    let (status, headers, _) =
        exchange(&mut stream, &post("/v1/responses/resp_unknown/cancel"), &small, small.len()).await;
    assert!((400..500).contains(&status), "cancel of an unknown response: {status}");
    assert!(!headers.contains("connection: close"), "{headers}");
    let (status, _, reply) =
        exchange(&mut stream, &format!("GET /v1/models HTTP/1.1\r\nhost: {addr}\r\n"), b"", 0).await;
    assert_eq!(status, 200, "the same connection still serves: {}", String::from_utf8_lossy(&reply));

    // Over the body limit with the rest of the body still to come: refused before it is read,
    // and the response says the connection closes.
    let (status, headers, _) = exchange(&mut stream, &post("/v1/responses"), &body, 20 * 1024).await;
    assert_eq!(status, 413);
    assert!(headers.contains("connection: close"), "{headers}");

    // A body announced over the limit and not sent: refused by its length (waiting for it
    // would end in a 408), and the connection closes.
    let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let (status, headers, _) = exchange(&mut stream, &post("/v1/responses"), &vec![b' '; 1 << 20], 0).await;
    assert_eq!(status, 413);
    assert!(headers.contains("connection: close"), "{headers}");

    // A body that never ends, to a path tether does not serve: answered once waiting for the
    // rest gives up, and the connection closes rather than waiting for it.
    let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let started = std::time::Instant::now();
    let (status, headers, _) = exchange(&mut stream, &post("/v1/nope"), &body, 1024).await;
    assert_eq!(status, 404);
    assert!(headers.contains("connection: close"), "{headers}");
    assert!(started.elapsed() < std::time::Duration::from_secs(10), "answered within the read timeout's bound");
}
