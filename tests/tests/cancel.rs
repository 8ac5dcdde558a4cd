//! `POST /v1/responses/{id}/cancel` for a turn in flight: the SSE or WebSocket stream ends
//! with `response.incomplete` carrying `status: "cancelled"`, the cancel answers the same
//! object, the shard stops decoding, the session continues, and finished, unknown and other
//! tenants' responses get the protocol's errors.

use std::time::Duration;

use serde_json::{Value, json};
use tether_edge::config::AuthMode;
use tether_proto::shard::v1::InfoRequest;
use tether_proto::shard::v1::shard_client::ShardClient;
use tether_tests::client::{WsClient, cached_tokens, final_response};
use tether_tests::scrape::metric_sum;
use tether_tests::{Cluster, wait};

const LIMIT: Duration = Duration::from_secs(10);

/// One shard decoding a token every 20 ms: a 5,000-token answer is in flight for 100 s,
/// far longer than any test runs, so a cancel always finds it.
async fn slow_cluster(edge: impl FnOnce(&mut tether_edge::EdgeConfig)) -> Cluster {
    Cluster::builder()
        .workers(1)
        .shards(1)
        .shard_config(|config| config.sim.decode_interval = Duration::from_millis(20))
        .edge_config(edge)
        .start()
        .await
}

fn long_turn() -> Value {
    json!({"input": "tell me everything", "metadata": {"tether_sim_output_tokens": "5000"}})
}

async fn wait_idle(cluster: &Cluster) {
    let base = cluster.url();
    wait::until(LIMIT, "the edge's in-flight gauge back to 0", || {
        let base = base.clone();
        async move { (metric_sum(&base, "tether_edge_in_flight_responses").await == 0.0).then_some(()) }
    })
    .await;
    let mut shard = ShardClient::connect(cluster.shards[0].url()).await.unwrap();
    wait::until(LIMIT, "the shard's decode slots free", || {
        let mut shard = shard.clone();
        async move { (shard.info(InfoRequest {}).await.unwrap().into_inner().slots_busy == 0).then_some(()) }
    })
    .await;
    assert_eq!(shard.info(InfoRequest {}).await.unwrap().into_inner().slots_busy, 0);
}

async fn cancel(base: &str, key: &str, id: &str) -> (u16, Value) {
    let reply =
        reqwest::Client::new().post(format!("{base}/v1/responses/{id}/cancel")).bearer_auth(key).send().await.unwrap();
    let status = reply.status().as_u16();
    assert!(reply.headers().contains_key("x-request-id"), "a request id on every reply");
    (status, reply.json().await.unwrap())
}

async fn create(base: &str, key: &str, body: Value) -> Value {
    let reply =
        reqwest::Client::new().post(format!("{base}/v1/responses")).bearer_auth(key).json(&body).send().await.unwrap();
    assert_eq!(reply.status().as_u16(), 200);
    reply.json().await.unwrap()
}

/// The events of an SSE response, read frame by frame.
struct Sse {
    body: reqwest::Response,
    buffer: String,
}

impl Sse {
    async fn open(base: &str, mut body: Value) -> Sse {
        body["stream"] = json!(true);
        let reply = reqwest::Client::new()
            .post(format!("{base}/v1/responses"))
            .bearer_auth("sk-local")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(reply.status().as_u16(), 200);
        Sse { body: reply, buffer: String::new() }
    }

    /// The next event, or `None` once the body ended.
    async fn next(&mut self) -> Option<Value> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let frame: String = self.buffer.drain(..end + 2).collect();
                let data = frame.lines().find_map(|line| line.strip_prefix("data: ")).expect("a data line");
                return Some(serde_json::from_str(data).expect("JSON data"));
            }
            let chunk = wait::within(LIMIT, "an SSE chunk", self.body.chunk()).await.expect("the body reads")?;
            self.buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }

    async fn until(&mut self, kind: &str) -> Value {
        loop {
            let event = self.next().await.unwrap_or_else(|| panic!("the stream ended before {kind}"));
            if event["type"] == kind {
                return event;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_an_sse_stream_ends_it_cancelled_and_the_session_continues() {
    let cluster = slow_cluster(|_| {}).await;
    let base = cluster.url();
    let first =
        create(&base, "sk-local", json!({"input": "hello", "metadata": {"tether_sim_output_tokens": "4"}})).await;
    assert_eq!(first["status"], "completed");
    let first_id = first["id"].as_str().unwrap();

    let mut body = long_turn();
    body["previous_response_id"] = json!(first_id);
    let mut sse = Sse::open(&base, body).await;
    let created = sse.until("response.created").await;
    let id = created["response"]["id"].as_str().unwrap().to_owned();
    sse.until("response.output_text.delta").await;

    let (status, cancelled) = cancel(&base, "sk-local", &id).await;
    assert_eq!(status, 200, "{cancelled}");
    assert_eq!(cancelled["id"], id.as_str());
    assert_eq!(cancelled["object"], "response");
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
    let message = &cancelled["output"][0];
    assert_eq!(message["status"], "incomplete", "the cut message: {cancelled}");
    assert!(!message["content"][0]["text"].as_str().unwrap().is_empty(), "what was generated stays: {cancelled}");

    // The stream ends with the terminal event, carrying the same object, then closes.
    let terminal = sse.until("response.incomplete").await;
    assert_eq!(terminal["response"], cancelled, "the stream's end and the cancel's reply agree");
    assert!(sse.next().await.is_none(), "nothing follows the terminal event");
    wait_idle(&cluster).await;

    // Stored like any response; a second cancel answers it again.
    let stored: Value = reqwest::get(format!("{base}/v1/responses/{id}")).await.unwrap().json().await.unwrap();
    assert_eq!(stored["status"], "cancelled", "{stored}");
    let (status, again) = cancel(&base, "sk-local", &id).await;
    assert_eq!((status, &again), (200, &cancelled));

    // The session goes on: from the cancelled response (the shard kept nothing of the cut
    // turn, so the worker resends the prompt) and from its parent (still cached).
    let after = create(&base, "sk-local", json!({"input": "and now?", "previous_response_id": id})).await;
    assert_eq!(after["status"], "completed", "{after}");
    let fork = create(&base, "sk-local", json!({"input": "again", "previous_response_id": first_id})).await;
    assert_eq!(fork["status"], "completed", "{fork}");
    assert!(cached_tokens(&fork) > 0, "the parent's prefix is still the shard's: {fork}");

    // A finished response cannot be cancelled; an unknown id is not found.
    let (status, error) = cancel(&base, "sk-local", first_id).await;
    assert_eq!(status, 400, "{error}");
    assert_eq!(error["error"]["type"], "invalid_request_error");
    assert_eq!(error["error"]["code"], "response_not_cancellable");
    assert!(error["error"]["message"].as_str().unwrap().contains("'completed'"), "{error}");
    for unknown in ["resp_0000000000000000000000000000000000000000000000", "nonsense"] {
        let (status, error) = cancel(&base, "sk-local", unknown).await;
        assert_eq!(status, 404, "{error}");
        assert_eq!(error["error"]["code"], "not_found", "{error}");
    }
    wait_idle(&cluster).await;
}

fn two_tenants(config: &mut tether_edge::EdgeConfig) {
    config.auth = AuthMode::Keys;
    config.api_keys = [("sk-alpha".to_owned(), "alpha".to_owned()), ("sk-beta".to_owned(), "beta".to_owned())].into();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_turn_is_cancelled_from_another_connection_and_only_by_its_tenant() {
    let cluster = slow_cluster(two_tenants).await;
    let base = cluster.url();
    let mut ws = WsClient::connect(&cluster.ws_url(), Some("sk-alpha")).await.unwrap();
    let mut create = json!({"type": "response.create"});
    create.as_object_mut().unwrap().extend(long_turn().as_object().unwrap().clone());
    ws.send(&create).await;
    let mut id = String::new();
    loop {
        let event = ws.recv().await;
        if event["type"] == "response.created" {
            id = event["response"]["id"].as_str().unwrap().to_owned();
        }
        if event["type"] == "response.output_text.delta" {
            break;
        }
    }

    // Another tenant cannot see it, let alone stop it.
    let (status, error) = cancel(&base, "sk-beta", &id).await;
    assert_eq!(status, 404, "{error}");
    assert_eq!(error["error"]["code"], "not_found");
    assert_eq!(metric_sum(&base, "tether_edge_in_flight_responses").await, 1.0, "the turn runs on");

    let (status, cancelled) = cancel(&base, "sk-alpha", &id).await;
    assert_eq!(status, 200, "{cancelled}");
    assert_eq!(cancelled["status"], "cancelled");
    let events = ws.until_terminal().await;
    let last = events.last().unwrap();
    assert_eq!(last["type"], "response.incomplete", "{last}");
    assert_eq!(final_response(&events), &cancelled);
    wait_idle(&cluster).await;

    // The connection takes the next turn, chained from the cancelled one.
    let next = ws
        .create(json!({"input": "go on", "previous_response_id": id, "metadata": {"tether_sim_output_tokens": "4"}}))
        .await;
    assert_eq!(final_response(&next)["status"], "completed", "{next:?}");
    wait_idle(&cluster).await;
}
