//! A seeded fuzz test of every request field and WebSocket event type against an in-process
//! cluster: random and extreme values (huge numbers, negative numbers, wrong types, long strings,
//! deep nesting, many items, unknown item and event types) over JSON, SSE and one long-lived
//! WebSocket. It asserts that nothing panics (a panic hook counts panics in every node's threads),
//! that every answer is a success or a client error in the protocol's shape (never a 5xx), that the
//! WebSocket stays usable after each error, and that memory stays bounded.
//!
//! Seed and count: `TETHER_FUZZ_SEED` (default fixed) and `TETHER_FUZZ_ITERATIONS` (default 240);
//! a failure prints the seed and the request to reproduce it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Map, Value, json};
use tether_tests::Cluster;
use tether_tests::client::{Received, WsClient, final_response};
use tokio_tungstenite::tungstenite::Message;

static PANICS: AtomicUsize = AtomicUsize::new(0);

const DEFAULT_SEED: u64 = 0x7e7e_2026;
const DEFAULT_ITERATIONS: usize = 240;
/// Growth of this process's resident memory the whole run may cause (the cluster runs in it).
const RSS_GROWTH_LIMIT_BYTES: u64 = 192 << 20;
/// The whole loop's bound in time: the test stops early (and says so) rather than run on.
const TIME_LIMIT: Duration = Duration::from_secs(150);

/// The fields a `response.create` / `POST /v1/responses` body may carry, plus unknown ones.
const FIELDS: &[&str] = &[
    "model",
    "input",
    "instructions",
    "max_output_tokens",
    "metadata",
    "tools",
    "tool_choice",
    "previous_response_id",
    "stream",
    "store",
    "temperature",
    "top_p",
    "truncation",
    "text",
    "reasoning",
    "parallel_tool_calls",
    "include",
    "user",
    "prompt_cache_key",
    "background",
    "service_tier",
    "max_tool_calls",
    "top_logprobs",
    "conversation",
    "prompt",
    "safety_identifier",
    "x_unknown_field",
];

/// The fields that size work (drawn half of the time).
const HOT_FIELDS: &[&str] =
    &["metadata", "input", "tools", "max_output_tokens", "instructions", "stream", "truncation"];

/// Counts as strings, for the sim's metadata hints.
const EXTREME_COUNTS: &[&str] =
    &["4294967295", "4294967296", "18446744073709551615", "2147483647", "100000000", "1000000", "-1", "1e9", "0", " 7"];

/// WebSocket event types: the ones the protocol knows and some it does not.
const EVENT_TYPES: &[&str] = &[
    "response.create",
    "response.create",
    "response.create",
    "response.cancel",
    "session.update",
    "response.append",
    "input_audio_buffer.append",
    "",
    "response.create\u{0}",
];

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("VmRSS in /proc/self/status");
    kib * 1024
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

// === value generators ===

fn extreme_number(rng: &mut StdRng) -> Value {
    match rng.random_range(0..12) {
        0 => json!(0),
        1 => json!(-1),
        2 => json!(u64::MAX),
        3 => json!(i64::MIN),
        4 => json!(4_294_967_295u64),
        5 => json!(1e308),
        6 => json!(-1e308),
        7 => json!(0.5),
        8 => json!(2_147_483_648u64),
        9 => json!(rng.random_range(1..100_000)),
        10 => json!(rng.random_range(1..64)),
        _ => json!(f64::MIN_POSITIVE),
    }
}

fn string_value(rng: &mut StdRng) -> String {
    match rng.random_range(0..9) {
        0 => String::new(),
        1 => "x".repeat(rng.random_range(1_000..200_000)),
        2 => "\u{0}\u{1}\u{7f}".into(),
        3 => "ünïcödé 🚀 ℝ \u{202e}".into(),
        4 => "resp_".to_string() + &"a".repeat(rng.random_range(0..80)),
        5 => "4294967295".into(),
        6 => "-7".into(),
        7 => "tether-sim".into(),
        _ => format!("value-{}", rng.random::<u32>()),
    }
}

fn nested(depth: usize) -> Value {
    let mut value = json!("leaf");
    for _ in 0..depth {
        value = json!([value]);
    }
    value
}

fn input_item(rng: &mut StdRng) -> Value {
    match rng.random_range(0..9) {
        0 => json!({"role": "user", "content": string_value(rng)}),
        1 => json!({"type": "message", "role": "user", "content": [{"type": "input_text", "text": string_value(rng)}]}),
        2 => {
            json!({"type": "message", "role": "user", "content": [{"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]})
        }
        3 => json!({"type": "function_call_output", "call_id": string_value(rng), "output": string_value(rng)}),
        4 => json!({"type": "function_call", "call_id": "call_1", "name": "f", "arguments": string_value(rng)}),
        5 => json!({"type": "mystery", "payload": random_value(rng, 2)}),
        6 => json!({"role": "system", "content": random_value(rng, 2)}),
        7 => json!({"role": random_value(rng, 1), "content": "hi"}),
        _ => random_value(rng, 2),
    }
}

fn metadata(rng: &mut StdRng) -> Value {
    let mut map = Map::new();
    let pairs = match rng.random_range(0..6) {
        0 => rng.random_range(17..200),
        _ => rng.random_range(1..4),
    };
    for i in 0..pairs {
        let key = match (i, rng.random_range(0..6)) {
            (0, 0..=2) | (_, 0) => "tether_sim_output_tokens".to_string(),
            (_, 1) => "tether_sim_tool_calls".to_string(),
            (_, 2) => "k".repeat(rng.random_range(1..200)),
            _ => format!("key{i}"),
        };
        let value = match rng.random_range(0..8) {
            0 => json!(string_value(rng)),
            1 => extreme_number(rng),
            2 => json!("3"),
            _ => json!(EXTREME_COUNTS[rng.random_range(0..EXTREME_COUNTS.len())]),
        };
        map.insert(key, value);
    }
    Value::Object(map)
}

fn tool(rng: &mut StdRng) -> Value {
    let parameters = match rng.random_range(0..6) {
        0 => Value::Null,
        1 => json!({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}),
        2 => {
            json!({"type": "object", "properties": {"a": {"$ref": "#/$defs/A"}}, "$defs": {"A": {"type": "object", "properties": {"b": {"type": "integer", "minimum": 3}}}}})
        }
        3 => json!({"$ref": "#/$defs/loop", "$defs": {"loop": {"$ref": "#/$defs/loop"}}}),
        4 => nested(rng.random_range(1..300)),
        _ => random_value(rng, 3),
    };
    match rng.random_range(0..5) {
        0 => json!({"type": "web_search"}),
        1 => random_value(rng, 2),
        _ => {
            json!({"type": "function", "name": string_value(rng), "parameters": parameters, "strict": rng.random_bool(0.5)})
        }
    }
}

fn random_value(rng: &mut StdRng, depth: usize) -> Value {
    match rng.random_range(0..if depth == 0 { 5 } else { 8 }) {
        0 => Value::Null,
        1 => json!(rng.random_bool(0.5)),
        2 => extreme_number(rng),
        3 => json!(string_value(rng)),
        4 => json!(rng.random_range(0..3)),
        5 => Value::Array((0..rng.random_range(0..6)).map(|_| random_value(rng, depth - 1)).collect()),
        6 => {
            let mut map = Map::new();
            for i in 0..rng.random_range(0..6) {
                map.insert(format!("f{i}"), random_value(rng, depth - 1));
            }
            Value::Object(map)
        }
        _ => nested(rng.random_range(10..400)),
    }
}

/// A value for `field`: mostly of the shape the field expects but extreme, sometimes any value.
fn field_value(rng: &mut StdRng, field: &str) -> Value {
    if rng.random_ratio(1, 4) {
        return random_value(rng, 3);
    }
    match field {
        "input" => match rng.random_range(0..4) {
            0 => json!(string_value(rng)),
            1 => {
                Value::Array((0..rng.random_range(0..2_000)).map(|_| json!({"role": "user", "content": "w"})).collect())
            }
            _ => Value::Array((0..rng.random_range(0..8)).map(|_| input_item(rng)).collect()),
        },
        "max_output_tokens" | "max_tool_calls" | "top_logprobs" | "temperature" | "top_p" => extreme_number(rng),
        "metadata" => metadata(rng),
        "tools" => Value::Array(
            (0..if rng.random_ratio(1, 5) { rng.random_range(100..600) } else { rng.random_range(0..4) })
                .map(|_| tool(rng))
                .collect(),
        ),
        "tool_choice" => match rng.random_range(0..5) {
            0 => json!("auto"),
            1 => json!("required"),
            2 => json!("none"),
            3 => json!({"type": "function", "name": string_value(rng)}),
            _ => json!(string_value(rng)),
        },
        "stream" | "store" | "background" | "parallel_tool_calls" => match rng.random_range(0..4) {
            0 => json!(true),
            1 => json!(false),
            2 => json!("yes"),
            _ => json!(1),
        },
        "truncation" => json!(["auto", "disabled", "both", ""][rng.random_range(0..4)]),
        "text" => match rng.random_range(0..3) {
            0 => json!({"format": {"type": "json_object"}}),
            1 => json!({"format": {"type": "json_schema", "name": "x", "schema": random_value(rng, 2)}}),
            _ => json!({"format": random_value(rng, 2)}),
        },
        _ => json!(string_value(rng)),
    }
}

/// A request body: a valid base with one to three fields replaced or added.
fn request(rng: &mut StdRng) -> Map<String, Value> {
    let mut body = Map::new();
    body.insert("model".into(), json!("tether-sim"));
    body.insert("input".into(), json!("Say hello."));
    body.insert("max_output_tokens".into(), json!(16));
    for _ in 0..rng.random_range(1..4) {
        let field = if rng.random_bool(0.5) {
            HOT_FIELDS[rng.random_range(0..HOT_FIELDS.len())]
        } else {
            FIELDS[rng.random_range(0..FIELDS.len())]
        };
        if rng.random_ratio(1, 10) {
            body.remove(field);
        } else {
            let value = field_value(rng, field);
            body.insert(field.into(), value);
        }
    }
    body
}

/// The attacks found by hand (issue 11), run first on every seed.
fn known_attacks() -> Vec<Value> {
    let many_items: Vec<Value> = (0..58_000).map(|_| json!({"role": "user", "content": "word"})).collect();
    vec![
        json!({"model": "tether-sim", "input": "x", "max_output_tokens": 1, "metadata": {"tether_sim_output_tokens": "4294967295"}}),
        json!({"model": "tether-sim", "input": "x", "metadata": {"tether_sim_output_tokens": "4294967295"}}),
        json!({"model": "tether-sim", "input": "x", "max_output_tokens": 16, "metadata": {"tether_sim_output_tokens": "100000000"}}),
        json!({"model": "tether-sim", "input": "x", "max_output_tokens": 16, "tools": [{"type": "function", "name": "f"}], "metadata": {"tether_sim_tool_calls": "4294967295"}}),
        json!({"model": "tether-sim", "input": "word ".repeat(420_000), "max_output_tokens": 16}),
        json!({"model": "tether-sim", "input": many_items, "max_output_tokens": 16}),
        json!({"model": "tether-sim", "input": "x", "stream": "yes"}),
        json!({"model": "tether-sim", "input": "x", "max_output_tokens": u64::MAX}),
    ]
}

fn short(body: &Value) -> String {
    let text = body.to_string();
    if text.len() > 600 { format!("{}… ({} bytes)", &text[..600], text.len()) } else { text }
}

/// An error body or event in the Responses API's shape: an `error` object with a message.
fn assert_error_shape(error: &Value, context: &str) {
    assert!(error.is_object(), "error object in {context}: {}", short(error));
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "an error message in {context}: {}",
        short(error)
    );
    assert!(error["type"].is_string() || error["code"].is_string(), "a type or code in {context}: {}", short(error));
}

async fn http_case(http: &reqwest::Client, url: &str, body: &Value, context: &str) {
    let response = http
        .post(format!("{url}/v1/responses"))
        .bearer_auth("sk-fuzz")
        .json(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{context}: the edge answers ({e})"));
    let status = response.status().as_u16();
    let streamed =
        response.headers().get("content-type").is_some_and(|v| v.to_str().unwrap_or("").contains("event-stream"));
    let text = tokio::time::timeout(Duration::from_secs(30), response.text())
        .await
        .unwrap_or_else(|_| panic!("{context}: the body ends within 30 s"))
        .unwrap_or_else(|e| panic!("{context}: the body is readable ({e})"));
    assert!(status < 500, "{context}: a client error or success, got {status}: {}", &text[..text.len().min(400)]);
    if std::env::var_os("TETHER_FUZZ_VERBOSE").is_some() {
        eprintln!("{status} {}", &text[..text.len().min(200)]);
    }
    if status >= 400 {
        let value: Value =
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("{context}: a JSON error body, got {text}"));
        assert_error_shape(&value["error"], context);
    } else if streamed {
        let last = text.lines().filter_map(|l| l.strip_prefix("data: ")).next_back().unwrap_or_default();
        let event: Value =
            serde_json::from_str(last).unwrap_or_else(|_| panic!("{context}: the stream ends on a JSON event: {last}"));
        assert!(
            matches!(
                event["type"].as_str(),
                Some("response.completed" | "response.incomplete" | "response.failed" | "error")
            ),
            "{context}: the stream ends on a terminal event, got {}",
            short(&event)
        );
    } else {
        let value: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{context}: a JSON response"));
        assert_eq!(value["object"], "response", "{context}: a response object");
    }
}

/// Sends one event on the long-lived connection and reads until its terminal or error event.
async fn ws_case(ws: &mut WsClient, event: &Value, context: &str) {
    ws.send(event).await;
    loop {
        match ws.receive().await {
            Received::Closed(frame) => panic!("{context}: the connection closed after {}: {frame:?}", short(event)),
            Received::Event(reply) => match reply["type"].as_str() {
                Some("error") => {
                    assert_error_shape(&reply["error"], context);
                    return;
                }
                Some("response.completed" | "response.incomplete" | "response.failed") => return,
                _ if event["type"] != "response.create" => panic!("{context}: unexpected reply {}", short(&reply)),
                _ => {}
            },
        }
    }
}

async fn assert_usable(ws: &mut WsClient, http: &reqwest::Client, url: &str, context: &str) {
    let events = ws.create(json!({"model": "tether-sim", "input": "still there?", "max_output_tokens": 8})).await;
    assert!(
        matches!(final_response(&events)["status"].as_str(), Some("completed" | "incomplete")),
        "{context}: the WebSocket still serves a valid turn"
    );
    http_case(http, url, &json!({"model": "tether-sim", "input": "still there?", "max_output_tokens": 8}), context)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_and_extreme_requests_never_crash_and_leave_the_connection_usable() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        previous(info);
    }));
    let seed = env_or("TETHER_FUZZ_SEED", DEFAULT_SEED);
    let iterations = env_or("TETHER_FUZZ_ITERATIONS", DEFAULT_ITERATIONS);
    eprintln!("fuzz: seed {seed:#x}, {iterations} iterations (TETHER_FUZZ_SEED, TETHER_FUZZ_ITERATIONS)");
    let mut rng = StdRng::seed_from_u64(seed);

    // A fast sim: a request the caps let through decodes in microseconds per token.
    let cluster = Cluster::builder()
        .shards(1)
        .workers(2)
        .shard_config(|c| {
            c.sim.decode_interval = Duration::from_micros(5);
            c.sim.prefill_per_token = Duration::from_nanos(10);
        })
        .start()
        .await;
    let url = cluster.url();
    let http = reqwest::Client::new();
    let mut ws = WsClient::connect(&cluster.ws_url(), Some("sk-fuzz")).await.expect("connect");
    assert_usable(&mut ws, &http, &url, "warm-up").await;
    let started = Instant::now();
    let mut previous_ids: Vec<String> = Vec::new();

    for (i, attack) in known_attacks().into_iter().enumerate() {
        http_case(&http, &url, &attack, &format!("known attack {i} (HTTP) {}", short(&attack))).await;
        let mut event = attack.as_object().expect("an object").clone();
        event.insert("type".into(), json!("response.create"));
        let event = Value::Object(event);
        ws_case(&mut ws, &event, &format!("known attack {i} (WS) {}", short(&event))).await;
        assert_eq!(PANICS.load(Ordering::SeqCst), 0, "known attack {i}: a panic in a node");
    }
    assert_usable(&mut ws, &http, &url, "after the known attacks").await;
    // The baseline is taken after the known attacks: their multi-MiB bodies leave the allocator
    // holding memory it reuses later; growth past this point is what a long run would add.
    let rss_before = rss_bytes();

    for i in 0..iterations {
        if started.elapsed() > TIME_LIMIT {
            eprintln!("fuzz: stopped at iteration {i} (time limit {TIME_LIMIT:?})");
            break;
        }
        let mut body = request(&mut rng);
        if !previous_ids.is_empty() && rng.random_ratio(1, 4) {
            let id = previous_ids[rng.random_range(0..previous_ids.len())].clone();
            body.insert("previous_response_id".into(), json!(id));
        }
        let context = format!("seed {seed:#x} iteration {i}");
        match rng.random_range(0..5) {
            0 | 1 => {
                let body = Value::Object(body);
                http_case(&http, &url, &body, &format!("{context} (HTTP) {}", short(&body))).await;
            }
            2 => {
                // Raw bytes that are not a valid body: truncated JSON, wrong top-level types.
                let raw = match rng.random_range(0..4) {
                    0 => {
                        let text = Value::Object(body).to_string();
                        text[..rng.random_range(0..text.len())].to_string()
                    }
                    1 => "[]".into(),
                    2 => "null".into(),
                    _ => {
                        let depth = rng.random_range(100..20_000);
                        "[".repeat(depth) + &"]".repeat(depth)
                    }
                };
                let response = http
                    .post(format!("{url}/v1/responses"))
                    .bearer_auth("sk-fuzz")
                    .header("content-type", "application/json")
                    .body(raw)
                    .send()
                    .await
                    .expect("the edge answers a malformed body");
                let status = response.status().as_u16();
                assert!((400..500).contains(&status), "{context}: a malformed body is a client error, got {status}");
            }
            _ => {
                let mut event = body;
                let kind = EVENT_TYPES[rng.random_range(0..EVENT_TYPES.len())];
                event.insert("type".into(), json!(kind));
                let event = Value::Object(event);
                ws_case(&mut ws, &event, &format!("{context} (WS) {}", short(&event))).await;
                if rng.random_ratio(1, 8) {
                    // A frame that is not JSON, or JSON that is not an object.
                    let frame = ["not json", "[1,2]", "42", "{\"type\":7}"][rng.random_range(0..4)];
                    ws.send_message(Message::Text(frame.into())).await.expect("send");
                    match ws.receive().await {
                        Received::Event(reply) => {
                            assert_eq!(reply["type"], "error", "{context}: {frame} gets an error event");
                            assert_error_shape(&reply["error"], &context);
                        }
                        Received::Closed(frame) => panic!("{context}: closed after a bad frame: {frame:?}"),
                    }
                }
            }
        }
        if i % 20 == 19 {
            assert_usable(&mut ws, &http, &url, &context).await;
            let events =
                ws.create(json!({"model": "tether-sim", "input": "remember me", "max_output_tokens": 4})).await;
            if let Some(id) = final_response(&events)["id"].as_str() {
                previous_ids.push(id.to_string());
            }
        }
        assert_eq!(PANICS.load(Ordering::SeqCst), 0, "{context}: a panic in a node (see its message above)");
    }

    assert_usable(&mut ws, &http, &url, "after the run").await;
    let rss_after = rss_bytes();
    let growth = rss_after.saturating_sub(rss_before);
    eprintln!("fuzz: rss {} MiB → {} MiB in {:?}", rss_before >> 20, rss_after >> 20, started.elapsed());
    assert!(
        growth < RSS_GROWTH_LIMIT_BYTES,
        "resident memory grew by {} MiB (limit {} MiB)",
        growth >> 20,
        RSS_GROWTH_LIMIT_BYTES >> 20
    );
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "no panic in any node");
}
