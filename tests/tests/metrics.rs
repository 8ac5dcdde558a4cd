//! The metric names every service exposes, scraped from each node's `/metrics` after one turn
//! over HTTP and one over WebSocket, parsed with a Prometheus text-format parser and held to
//! the house rules (docs/style.md) and to OpenMetrics' family naming, under which a counter
//! `x_total` belongs to family `x` and a histogram `x` owns `x_bucket`, `x_sum`, `x_count`
//! and `x_created`: two families whose names collide that way cannot both be ingested.

use std::collections::{BTreeMap, BTreeSet};

use prometheus_parse::{LineInfo, SampleType, Scrape};
use serde_json::json;
use tether_tests::Cluster;
use tether_tests::client::{WsClient, final_response};

/// Prefixes a metric may start with: one per service; `tether_node_` for the membership and
/// ejection metrics of tether-common, which every service records; or a standard process metric.
/// The nodes of an in-process cluster share one recorder, so each `/metrics` shows them all.
const PREFIXES: [&str; 5] = ["tether_edge_", "tether_worker_", "tether_shard_", "tether_node_", "process_"];

/// The `# TYPE` declarations of one exposition, in order: (name as declared, type).
fn declared_types(text: &str) -> Vec<(String, SampleType)> {
    text.lines()
        .filter_map(|line| match LineInfo::parse(line) {
            // The parser names a histogram's family by its `_bucket` series, the alias is the family.
            LineInfo::Type { metric_name, metric_alias, sample_type } => {
                Some((metric_alias.unwrap_or(metric_name), sample_type))
            }
            _ => None,
        })
        .collect()
}

/// The OpenMetrics family name of a declared metric and the sample names it owns.
fn family(name: &str, kind: SampleType) -> (String, Vec<String>) {
    match kind {
        SampleType::Counter => {
            let base = name.strip_suffix("_total").unwrap_or(name).to_owned();
            let owned = vec![format!("{base}_total"), format!("{base}_created")];
            (base, owned)
        }
        SampleType::Histogram | SampleType::Summary => {
            let mut owned: Vec<String> =
                ["_sum", "_count", "_created"].iter().map(|suffix| format!("{name}{suffix}")).collect();
            owned.push(if kind == SampleType::Histogram { format!("{name}_bucket") } else { name.to_owned() });
            (name.to_owned(), owned)
        }
        SampleType::Gauge | SampleType::Untyped => (name.to_owned(), vec![name.to_owned()]),
    }
}

/// Every rule one service's exposition breaks, as readable lines (empty when it keeps them all).
fn violations(service: &str, text: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let scrape = match Scrape::parse(text.lines().map(|line| Ok(line.to_owned()))) {
        Ok(scrape) => scrape,
        Err(error) => return vec![format!("{service}: /metrics does not parse: {error}")],
    };
    let declared = declared_types(text);
    let mut types: BTreeMap<&str, SampleType> = BTreeMap::new();
    for (name, kind) in &declared {
        if let Some(first) = types.insert(name, *kind) {
            problems.push(format!("{service}: {name} is declared twice ({first:?}, then {kind:?})"));
        }
    }
    // Family names and owned sample names must be unique across families.
    let mut owners: BTreeMap<String, &str> = BTreeMap::new();
    let mut families: BTreeMap<String, &str> = BTreeMap::new();
    for (name, kind) in &types {
        let (base, owned) = family(name, *kind);
        if let Some(other) = families.insert(base.clone(), name) {
            problems.push(format!("{service}: {name} and {other} are one OpenMetrics family `{base}`"));
        }
        for sample in owned {
            if let Some(other) = owners.insert(sample.clone(), name) {
                problems.push(format!("{service}: {name} and {other} both own the series name `{sample}`"));
            }
        }
    }
    for (base, name) in &families {
        if let Some(other) = owners.get(base).filter(|other| *other != name) {
            problems.push(format!("{service}: family `{base}` of {name} is a series name of {other}"));
        }
    }
    for (name, kind) in &types {
        if !PREFIXES.iter().any(|prefix| name.starts_with(prefix)) {
            problems.push(format!("{service}: {name} has none of the prefixes {PREFIXES:?}"));
        }
        match kind {
            SampleType::Counter if !name.ends_with("_total") => {
                problems.push(format!("{service}: counter {name} does not end in _total"))
            }
            SampleType::Untyped => problems.push(format!("{service}: {name} is untyped")),
            _ => {}
        }
        let duration = ["_duration", "_latency", "_time", "_ms", "_us", "_millis", "_micros"]
            .iter()
            .any(|word| name.trim_end_matches("_total").ends_with(word) || name.contains(&format!("{word}_")));
        if duration || (matches!(kind, SampleType::Histogram | SampleType::Summary) && !name.ends_with("_seconds")) {
            problems.push(format!("{service}: {name} looks like a duration but does not end in _seconds"));
        }
    }
    // Every sample belongs to a declared family.
    let series: BTreeSet<&str> = owners.keys().map(String::as_str).collect();
    for sample in &scrape.samples {
        let name = sample.metric.as_str();
        if !series.contains(name) && !types.contains_key(name) {
            problems.push(format!("{service}: sample {name} belongs to no declared family"));
        }
    }
    if types.is_empty() {
        problems.push(format!("{service}: /metrics declares no metric"));
    }
    problems
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_exposes_well_formed_metric_families() {
    let cluster = Cluster::builder().shards(1).workers(1).start().await;
    // One turn over HTTP and one over WebSocket, so the turn, relay and connection metrics exist.
    let http = reqwest::Client::new();
    let reply = http
        .post(format!("{}/v1/responses", cluster.url()))
        .bearer_auth("sk-test")
        .json(&json!({"model": "tether-sim", "input": "Hello."}))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 200, "the HTTP turn succeeds");
    let mut ws = WsClient::connect(&cluster.ws_url(), Some("sk-test")).await.unwrap();
    let events = ws.create(json!({"model": "tether-sim", "input": "Hello again.", "stream": true})).await;
    assert_eq!(final_response(&events)["status"], "completed");
    drop(ws);

    let nodes = [("edge", &cluster.edges[0]), ("worker", &cluster.workers[0]), ("shard", &cluster.shards[0])];
    let mut problems = Vec::new();
    for (service, node) in nodes {
        let reply = http.get(format!("{}/metrics", node.url())).send().await.unwrap();
        assert_eq!(reply.status(), 200, "{service} serves /metrics");
        let text = reply.text().await.unwrap();
        assert!(text.contains(&format!("tether_{service}_")), "{service}'s own metrics are exposed:\n{text}");
        problems.extend(violations(service, &text));
    }
    assert!(problems.is_empty(), "metric naming problems:\n{}", problems.join("\n"));
}
