//! Issue 11, the edge's part: boundaries that hold under abuse. Each test reproduces one
//! finding of the attacker's pass (against `--auth keys` with two tenants) and asserts the
//! outcome the fix promises.

use std::time::Duration;

use futures_util::SinkExt;
use serde_json::{Value, json};
use tether_edge::config::AuthMode;
use tether_tests::client::{Received, WsClient, final_response};
use tether_tests::scrape::metric_sum;
use tether_tests::{Cluster, wait};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::{self, Message};

const LIMIT: Duration = Duration::from_secs(10);

fn two_tenants(config: &mut tether_edge::EdgeConfig) {
    config.auth = AuthMode::Keys;
    config.api_keys = [("sk-alpha".to_owned(), "alpha".to_owned()), ("sk-beta".to_owned(), "beta".to_owned())].into();
}

async fn wait_in_flight_zero(base: &str) {
    wait::until(LIMIT, "tether_edge_in_flight_responses back to 0", || async move {
        (metric_sum(base, "tether_edge_in_flight_responses").await == 0.0).then_some(())
    })
    .await;
}

fn long_create(lane: &str, tokens: u32) -> Value {
    json!({"type": "response.create", "input": "go on", "stream_id": lane,
           "metadata": {"tether_sim_output_tokens": tokens.to_string()}})
}

async fn post_create(base: &str, key: &str, body: Value) -> (u16, Value) {
    let reply =
        reqwest::Client::new().post(format!("{base}/v1/responses")).bearer_auth(key).json(&body).send().await.unwrap();
    let status = reply.status().as_u16();
    (status, reply.json().await.unwrap_or(Value::Null))
}

/// Reads from a raw connection until the server closes it; returns what it sent.
async fn read_until_closed(stream: &mut TcpStream) -> String {
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => return String::from_utf8_lossy(&received).into_owned(),
            Ok(n) => received.extend_from_slice(&buffer[..n]),
        }
    }
}

// === 1. one admission path: nothing leaks when clients go away ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_11_in_flight_gauge_returns_to_zero_after_clients_disconnect_mid_stream() {
    let cluster = Cluster::builder().workers(1).shards(1).start().await;
    let base = cluster.url();
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut ws = WsClient::connect(&cluster.ws_url(), None).await.unwrap();
        for lane in ["a", "b", "c", "d"] {
            ws.send(&long_create(lane, 5_000)).await;
        }
        let mut created = 0;
        while created < 4 {
            if ws.recv().await["type"] == "response.created" {
                created += 1;
            }
        }
        clients.push(ws);
    }
    assert_eq!(metric_sum(&base, "tether_edge_in_flight_responses").await, 12.0);
    // An SSE client that goes away mid-stream too.
    let mut sse = reqwest::Client::new()
        .post(format!("{base}/v1/responses"))
        .json(&json!({"input": "long", "stream": true, "metadata": {"tether_sim_output_tokens": "5000"}}))
        .send()
        .await
        .unwrap();
    assert!(sse.chunk().await.unwrap().is_some(), "the first SSE frame");
    assert_eq!(metric_sum(&base, "tether_edge_in_flight_responses").await, 13.0);
    tracing::info!("--- every client disconnects");
    drop(clients);
    drop(sse);
    wait_in_flight_zero(&base).await;
}

// === 2. fair sharing per tenant ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_11_a_tenant_cannot_take_another_tenants_in_flight_slots() {
    // max-in-flight 4 and two tenants: each gets 2 by default.
    let cluster = Cluster::builder()
        .workers(1)
        .shards(1)
        .edge_config(|c| {
            two_tenants(c);
            c.max_in_flight = 4;
        })
        .start()
        .await;
    let mut alpha = WsClient::connect(&cluster.ws_url(), Some("sk-alpha")).await.unwrap();
    for lane in ["a", "b", "c", "d"] {
        alpha.send(&long_create(lane, 2_000)).await;
    }
    let (mut created, mut refused) = (0, Vec::new());
    while created + refused.len() < 4 {
        let event = alpha.recv().await;
        match event["type"].as_str() {
            Some("response.created") => created += 1,
            Some("error") => refused.push(event),
            _ => {}
        }
    }
    assert_eq!(created, 2, "alpha's share: 2 of 4");
    for event in &refused {
        assert_eq!(event["status"], 429, "{event}");
        assert_eq!(event["error"]["code"], "rate_limit_exceeded", "{event}");
        assert!(event["stream_id"].is_string(), "the refusal names its lane: {event}");
    }
    tracing::info!("--- beta still gets its share while alpha's two run");
    let (status, body) = post_create(&cluster.url(), "sk-beta", json!({"input": "hi"})).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = post_create(&cluster.url(), "sk-alpha", json!({"input": "hi"})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (429, Some("rate_limit_exceeded")));
    tracing::info!("--- alpha's connection stays usable");
    let mut completed = 0;
    while completed < 2 {
        if alpha.recv().await["type"] == "response.completed" {
            completed += 1;
        }
    }
    let events = alpha.create(json!({"input": "again", "stream_id": "c"})).await;
    assert_eq!(final_response(&events)["status"], "completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_11_websocket_connections_are_limited_per_tenant() {
    let cluster = Cluster::builder()
        .workers(1)
        .shards(1)
        .edge_config(|c| {
            two_tenants(c);
            c.tenant_max_connections = Some(2);
        })
        .start()
        .await;
    let first = WsClient::connect(&cluster.ws_url(), Some("sk-alpha")).await.unwrap();
    let _second = WsClient::connect(&cluster.ws_url(), Some("sk-alpha")).await.expect("at the limit");
    match WsClient::connect(&cluster.ws_url(), Some("sk-alpha")).await {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 429),
        Err(other) => panic!("expected a 429 handshake, got {other}"),
        Ok(_) => panic!("a third alpha connection was accepted"),
    }
    let mut beta = WsClient::connect(&cluster.ws_url(), Some("sk-beta")).await.expect("beta has its own connections");
    assert_eq!(final_response(&beta.create(json!({"input": "hi"})).await)["status"], "completed");
    drop(first);
    wait::until(LIMIT, "alpha's closed connection frees its slot", || {
        let url = cluster.ws_url();
        async move { WsClient::connect(&url, Some("sk-alpha")).await.ok() }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_11_request_rate_is_limited_per_tenant() {
    let cluster = Cluster::builder()
        .workers(1)
        .shards(1)
        .edge_config(|c| {
            two_tenants(c);
            // Three requests, then (in any test's lifetime) no refill.
            c.tenant_rate = Some(0.001);
            c.tenant_burst = 3;
        })
        .start()
        .await;
    let http = reqwest::Client::new();
    let models = |key: &'static str| {
        let request = http.get(format!("{}/v1/models", cluster.url())).bearer_auth(key);
        async move { request.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(models("sk-alpha").await, 200);
    let (status, _) = post_create(&cluster.url(), "sk-alpha", json!({"input": "hi"})).await;
    assert_eq!(status, 200);
    let mut ws =
        WsClient::connect(&cluster.ws_url(), Some("sk-alpha")).await.expect("the third request: the handshake");
    ws.send(&json!({"type": "response.create", "input": "hi", "stream_id": "x"})).await;
    let event = ws.recv().await;
    assert_eq!((event["type"].as_str(), event["status"].as_u64()), (Some("error"), Some(429)), "{event}");
    assert_eq!(event["error"]["code"], "rate_limit_exceeded");
    assert_eq!(event["stream_id"], "x");
    let (status, body) = post_create(&cluster.url(), "sk-alpha", json!({"input": "hi"})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (429, Some("rate_limit_exceeded")));
    assert_eq!(models("sk-beta").await, 200, "beta has its own bucket");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_11_a_websocket_client_that_does_not_read_is_cut_and_frees_its_slots() {
    let cluster = Cluster::builder()
        .workers(1)
        .shards(1)
        .edge_config(|c| {
            c.max_in_flight = 16;
            c.client_read_timeout = Duration::from_millis(500);
        })
        .start()
        .await;
    // A client with a tiny receive window that never reads.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(cluster.edges[0].addr).await.unwrap();
    let request = cluster.ws_url().into_client_request().unwrap();
    let (mut silent, _) =
        wait::within(LIMIT, "handshake", tokio_tungstenite::client_async(request, stream)).await.expect("handshake");
    for lane in 0..16 {
        // At the sim's 1,000 tokens/s each token is its own event: 16 lanes send ~3 MB a
        // second, far past what the socket buffers and the edge's channel hold.
        silent.send(Message::Text(long_create(&format!("l{lane}"), 10_000).to_string().into())).await.unwrap();
    }
    wait::until(LIMIT, "the silent client's responses hold every slot", || {
        let base = cluster.url();
        async move { (metric_sum(&base, "tether_edge_in_flight_responses").await == 16.0).then_some(()) }
    })
    .await;
    tracing::info!("--- the silent client is cut after the read timeout and its slots come back");
    let (status, body) = wait::until(Duration::from_secs(20), "a create admitted again", || {
        let base = cluster.url();
        async move {
            let (status, body) = post_create(&base, "sk-any", json!({"input": "hi"})).await;
            (status != 429).then_some((status, body))
        }
    })
    .await;
    assert_eq!(status, 200, "{body}");
    wait_in_flight_zero(&cluster.url()).await;
    assert!(metric_sum(&cluster.url(), "tether_edge_slow_clients_total").await >= 1.0);
    drop(silent);
}

// === 3. bounded queues on a WebSocket connection ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_11_queued_creates_are_capped_by_count_and_bytes() {
    let cluster = Cluster::builder()
        .workers(1)
        .shards(1)
        .edge_config(|c| {
            c.ws_max_queued = 3;
            c.ws_max_queued_bytes = 6_000;
        })
        .start()
        .await;
    let mut ws = WsClient::connect(&cluster.ws_url(), None).await.unwrap();
    let padded = |size: usize| json!({"type": "response.create", "stream_id": "a", "input": "x".repeat(size), "generate": false});
    // The first runs (2 s); the rest wait behind it on lane a.
    ws.send(&long_create("a", 2_000)).await;
    ws.send(&padded(4_000)).await; // queued: 1, ~4 KB
    ws.send(&padded(4_000)).await; // past the bytes cap: refused
    ws.send(&padded(10)).await; // queued: 2
    ws.send(&padded(10)).await; // queued: 3, at the count cap
    ws.send(&padded(10)).await; // past the count cap: refused
    let (mut completed, mut refused) = (0, 0);
    while completed + refused < 6 {
        let event = ws.recv().await;
        match event["type"].as_str() {
            Some("response.completed") => completed += 1,
            Some("error") => {
                assert_eq!(event["error"]["code"], "rate_limit_exceeded", "{event}");
                assert_eq!(event["status"], 429);
                assert_eq!(event["stream_id"], "a");
                refused += 1;
            }
            _ => {}
        }
        assert!(refused <= 2, "only the two past the caps are refused");
    }
    assert_eq!((completed, refused), (4, 2));
    let events = ws.create(json!({"input": "still usable", "stream_id": "a"})).await;
    assert_eq!(final_response(&events)["status"], "completed");
}

// === 4. HTTP hygiene ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_11_a_slowloris_header_is_closed_within_the_header_timeout() {
    let cluster = Cluster::builder()
        .workers(1)
        .shards(1)
        .edge_config(|c| c.header_read_timeout = Duration::from_millis(500))
        .start()
        .await;
    let addr = cluster.edges[0].addr;
    // Within the bound: a header sent in two parts is served.
    let mut patient = TcpStream::connect(addr).await.unwrap();
    patient.write_all(b"GET /healthz HTTP/1.1\r\nHost: edge\r\n").await.unwrap();
    patient.write_all(b"Connection: close\r\n\r\n").await.unwrap();
    let reply = wait::within(LIMIT, "the complete request answered", read_until_closed(&mut patient)).await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    // Past it: half a header and nothing more.
    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"POST /v1/responses HTTP/1.1\r\nHost: edge\r\nContent-Ty").await.unwrap();
    let started = std::time::Instant::now();
    let reply =
        wait::within(Duration::from_secs(5), "the slowloris connection closed", read_until_closed(&mut slow)).await;
    assert!(!reply.starts_with("HTTP/1.1 2"), "{reply}");
    assert!(started.elapsed() >= Duration::from_millis(400), "not before the timeout: {:?}", started.elapsed());
    // An idle keep-alive connection is closed by the same timeout.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: edge\r\n\r\n").await.unwrap();
    let reply = wait::within(Duration::from_secs(5), "the idle connection closed", read_until_closed(&mut idle)).await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_11_a_chunked_body_that_never_ends_gets_408() {
    let cluster = Cluster::builder()
        .workers(1)
        .shards(1)
        .edge_config(|c| c.body_read_timeout = Duration::from_millis(500))
        .start()
        .await;
    let mut stream = TcpStream::connect(cluster.edges[0].addr).await.unwrap();
    stream
        .write_all(b"POST /v1/responses HTTP/1.1\r\nHost: edge\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"inp\r\n")
        .await
        .unwrap();
    let reply = wait::within(Duration::from_secs(5), "the endless body cut", read_until_closed(&mut stream)).await;
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(reply.contains("request_timeout"), "{reply}");
    // A body that arrives in time is fine.
    let (status, _) = post_create(&cluster.url(), "sk-any", json!({"input": "hi"})).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_11_http_connections_are_capped_at_accept() {
    let cluster = Cluster::builder().workers(1).shards(1).edge_config(|c| c.max_http_connections = 2).start().await;
    let addr = cluster.edges[0].addr;
    async fn served(stream: &mut TcpStream) -> bool {
        if stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: edge\r\n\r\n").await.is_err() {
            return false;
        }
        let mut buffer = [0u8; 1024];
        match stream.read(&mut buffer).await {
            Ok(n) => buffer[..n].starts_with(b"HTTP/1.1 200"),
            Err(_) => false,
        }
    }
    // Two kept-alive connections, at the limit (retry while the harness's own close).
    let mut held = Vec::new();
    for _ in 0..2 {
        let stream = wait::until(LIMIT, "a connection served", || async move {
            let mut stream = TcpStream::connect(addr).await.ok()?;
            served(&mut stream).await.then_some(stream)
        })
        .await;
        held.push(stream);
    }
    let mut third = TcpStream::connect(addr).await.unwrap();
    let reply = wait::within(LIMIT, "the third connection answered", read_until_closed(&mut third)).await;
    assert!(reply.starts_with("HTTP/1.1 503"), "{reply}");
    assert!(served(&mut held[0]).await, "the held connections still work");
    drop(held.remove(0));
    wait::until(LIMIT, "a freed slot serves a new connection", || async move {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        served(&mut stream).await.then_some(())
    })
    .await;
}

// === 5. small findings ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_11_an_invalid_utf8_text_frame_closes_with_1007() {
    let cluster = Cluster::builder().workers(1).shards(1).start().await;
    let mut ws = WsClient::connect(&cluster.ws_url(), None).await.unwrap();
    let frame = Frame::message(vec![b'{', 0xff, 0xfe, b'}'], OpCode::Data(Data::Text), true);
    ws.send_message(Message::Frame(frame)).await.unwrap();
    match ws.receive().await {
        Received::Closed(Some(frame)) => assert_eq!(u16::from(frame.code), 1007),
        other => panic!("expected a 1007 close, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_11_http_small_findings_stream_type_bearer_spaces_and_the_cluster_view() {
    let cluster = Cluster::builder().workers(1).shards(1).edge_config(two_tenants).start().await;
    let base = cluster.url();
    for stream in [json!("yes"), json!(1)] {
        let (status, body) = post_create(&base, "sk-alpha", json!({"input": "hi", "stream": stream})).await;
        assert_eq!(status, 400, "stream {stream}: {body}");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["param"], "stream");
    }
    let http = reqwest::Client::new();
    let status = |request: reqwest::RequestBuilder| async move { request.send().await.unwrap().status().as_u16() };
    let models = format!("{base}/v1/models");
    assert_eq!(status(http.get(&models).header("authorization", "Bearer sk-alpha")).await, 200);
    assert_eq!(status(http.get(&models).header("authorization", "Bearer  sk-alpha ")).await, 401, "not trimmed");
    assert_eq!(status(http.get(&models).header("authorization", "Bearer  sk-alpha")).await, 401);
    let cluster_view = format!("{base}/v1/cluster");
    assert_eq!(status(http.get(&cluster_view)).await, 403, "no admin key configured");
    assert_eq!(status(http.get(&cluster_view).bearer_auth("sk-alpha")).await, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_11_the_cluster_view_needs_the_admin_key() {
    let cluster = Cluster::builder()
        .workers(1)
        .shards(1)
        .edge_config(|c| {
            two_tenants(c);
            c.admin_key = Some(tether_edge::config::AdminKey("sk-operator".into()));
        })
        .start()
        .await;
    let http = reqwest::Client::new();
    let url = format!("{}/v1/cluster", cluster.url());
    assert_eq!(http.get(&url).send().await.unwrap().status(), 401);
    assert_eq!(http.get(&url).bearer_auth("sk-alpha").send().await.unwrap().status(), 403, "a tenant key");
    let view: Value = http.get(&url).bearer_auth("sk-operator").send().await.unwrap().json().await.unwrap();
    assert_eq!(view["workers"].as_array().map(Vec::len), Some(1));
    assert_eq!(http.get(format!("{}/metrics", cluster.url())).send().await.unwrap().status(), 200, "metrics stay open");
    let open = Cluster::builder().workers(1).shards(1).start().await;
    assert_eq!(reqwest::get(format!("{}/v1/cluster", open.url())).await.unwrap().status(), 200, "open in open mode");
}
