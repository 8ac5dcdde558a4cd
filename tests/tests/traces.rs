//! One trace per turn across edge, worker and shard, exported over OTLP/gRPC to a collector
//! that runs in this test (the generated `TraceService` of `opentelemetry-proto` on a loopback
//! port). The tracer is process-wide, so this file holds one test: an HTTP turn that continues
//! a client's `traceparent`, and a WebSocket turn whose trace links to the upgrade's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::trace::v1::Span;
use serde_json::{Value, json};
use tether_common::trace::{TURN_SPAN, TURN_STAGES};
use tether_tests::client::{WsClient, final_response};
use tether_tests::{Cluster, wait};

/// A span as the collector received it, ids in hex.
#[derive(Clone, Debug)]
struct Received {
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    attributes: HashMap<String, String>,
    links: Vec<(String, String)>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl From<&Span> for Received {
    fn from(span: &Span) -> Self {
        let attributes = span
            .attributes
            .iter()
            .map(|kv| {
                let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                    Some(any_value::Value::StringValue(s)) => s.clone(),
                    Some(any_value::Value::IntValue(i)) => i.to_string(),
                    Some(any_value::Value::BoolValue(b)) => b.to_string(),
                    other => format!("{other:?}"),
                };
                (kv.key.clone(), value)
            })
            .collect();
        Received {
            name: span.name.clone(),
            trace_id: hex(&span.trace_id),
            span_id: hex(&span.span_id),
            parent_span_id: hex(&span.parent_span_id),
            attributes,
            links: span.links.iter().map(|link| (hex(&link.trace_id), hex(&link.span_id))).collect(),
        }
    }
}

#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Received>>>,
    services: Arc<Mutex<Vec<String>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        for resource in request.into_inner().resource_spans {
            let service = resource
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref()?.value.as_ref())
                .map(|v| format!("{v:?}"));
            self.services.lock().unwrap().extend(service);
            let spans = resource.scope_spans.iter().flat_map(|scope| &scope.spans).map(Received::from);
            self.spans.lock().unwrap().extend(spans);
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

impl Collector {
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming));
        format!("http://{addr}")
    }

    fn trace(&self, trace_id: &str) -> Vec<Received> {
        self.spans.lock().unwrap().iter().filter(|span| span.trace_id == trace_id).cloned().collect()
    }
}

fn one<'a>(spans: &'a [Received], name: &str) -> &'a Received {
    let matching: Vec<&Received> = spans.iter().filter(|span| span.name == name).collect();
    assert_eq!(matching.len(), 1, "one {name} span in the trace: {spans:#?}");
    matching[0]
}

/// Waits until the turn's trace has every expected span, flushing the exporter each round.
async fn complete_trace(
    collector: &Collector,
    telemetry: &Arc<tether_common::telemetry::TelemetryGuard>,
    trace_id: &str,
) -> Vec<Received> {
    wait::until(Duration::from_secs(20), "the turn's spans at the collector", || {
        let telemetry = telemetry.clone();
        let spans = collector.trace(trace_id);
        async move {
            let names: Vec<&str> = spans.iter().map(|span| span.name.as_str()).collect();
            let expected = std::iter::once(&TURN_SPAN).chain(&TURN_STAGES);
            if expected.into_iter().all(|name| names.contains(name)) {
                return Some(spans);
            }
            let _ = tokio::task::spawn_blocking(move || telemetry.flush()).await;
            None
        }
    })
    .await
}

/// The parent/child links of one turn: edge → worker → shard, each stage under its service's
/// span, and each service's top span labelled with its node.
fn assert_parentage(spans: &[Received]) {
    let by_id: HashMap<&str, &Received> = spans.iter().map(|span| (span.span_id.as_str(), span)).collect();
    let parent = |span: &Received| by_id.get(span.parent_span_id.as_str()).map(|p| p.name.as_str());
    let edge_turn = one(spans, TURN_SPAN);
    for name in ["edge.admission", "edge.placement", "edge.relay"] {
        assert_eq!(parent(one(spans, name)), Some("edge.turn"), "{name} under edge.turn");
    }
    let worker_turn = one(spans, "worker.turn");
    assert_eq!(parent(worker_turn), Some("edge.relay"), "the worker's turn is a child of the edge's relay");
    assert!(worker_turn.attributes["node"].starts_with("worker-"), "{worker_turn:?}");
    for name in ["worker.parse", "worker.resolve", "worker.validate", "worker.safety", "worker.render", "worker.infer"]
    {
        assert_eq!(parent(one(spans, name)), Some("worker.turn"), "{name} under worker.turn");
    }
    assert_eq!(parent(one(spans, "worker.replicate")), Some("worker.turn"));
    let generate = one(spans, "shard.generate");
    assert_eq!(parent(generate), Some("worker.infer"), "the shard's generation is a child of the worker's infer");
    assert!(generate.attributes["node"].starts_with("shard-"), "{generate:?}");
    for name in ["shard.queue", "shard.prefill", "shard.decode"] {
        assert_eq!(parent(one(spans, name)), Some("shard.generate"), "{name} under shard.generate");
    }
    // No span of the turn carries the prompt.
    for span in spans {
        assert!(span.attributes.values().all(|value| !value.contains("Trace this")), "{span:?}");
    }
    let _ = edge_turn;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_turn_is_one_trace_across_edge_worker_and_shard() {
    let collector = Collector::default();
    let endpoint = collector.start().await;
    let telemetry = tether_common::telemetry::init_for_test_with_otlp(&endpoint, "tether-test")
        .expect("the first subscriber of this process");
    let telemetry = Arc::new(telemetry);
    let cluster = Cluster::builder().start().await;

    // HTTP: the client's traceparent is the parent of the turn's trace.
    let client_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let reply = reqwest::Client::new()
        .post(format!("{}/v1/responses", cluster.url()))
        .header("traceparent", format!("00-{client_trace}-{client_span}-01"))
        .json(&json!({"model": "tether-sim", "input": "Trace this turn."}))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 200);
    let response: Value = reply.json().await.unwrap();
    assert_eq!(response["x_tether"]["trace_id"], client_trace, "the response quotes its trace id");
    let spans = complete_trace(&collector, &telemetry, client_trace).await;
    assert_parentage(&spans);
    let edge_turn = one(&spans, TURN_SPAN);
    assert_eq!(edge_turn.parent_span_id, client_span, "the client's span is the parent of edge.turn");
    assert_eq!(edge_turn.attributes["transport"], "http");

    // WebSocket: each turn is a trace of its own, linked to the upgrade's traceparent.
    let upgrade_trace = "0af7651916cd43dd8448eb211c80319c";
    let upgrade_span = "b7ad6b7169203331";
    let traceparent = format!("00-{upgrade_trace}-{upgrade_span}-01");
    let mut ws = WsClient::connect_with(&cluster.ws_url(), &[("traceparent", &traceparent)]).await.unwrap();
    let mut trace_ids = Vec::new();
    for input in ["Trace this socket turn.", "Trace this one too."] {
        let previous = trace_ids.last().map(|(_, id): &(String, Value)| id.clone()).unwrap_or(Value::Null);
        let events = ws
            .create(json!({"model": "tether-sim", "input": input, "previous_response_id": previous, "stream": true}))
            .await;
        let response = final_response(&events);
        let trace_id = response["x_tether"]["trace_id"].as_str().expect("x_tether.trace_id").to_owned();
        assert_eq!(trace_id.len(), 32);
        assert_ne!(trace_id, upgrade_trace, "a socket turn starts its own trace");
        trace_ids.push((trace_id, response["id"].clone()));
    }
    assert_ne!(trace_ids[0].0, trace_ids[1].0, "one trace per turn on the same socket");
    for (trace_id, _) in &trace_ids {
        let spans = complete_trace(&collector, &telemetry, trace_id).await;
        assert_parentage(&spans);
        let edge_turn = one(&spans, TURN_SPAN);
        assert_eq!(edge_turn.parent_span_id, "", "a socket turn's edge.turn is the trace's root");
        assert_eq!(edge_turn.links, vec![(upgrade_trace.to_owned(), upgrade_span.to_owned())]);
        assert_eq!(edge_turn.attributes["transport"], "websocket");
    }
    assert!(collector.services.lock().unwrap().iter().all(|service| service.contains("tether-test")));
}
