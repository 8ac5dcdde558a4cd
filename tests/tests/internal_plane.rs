//! The internal plane is not trusted by position: with mutual TLS, edge, workers and shards
//! speak only to holders of a certificate from the cluster CA; every internal read names the
//! tenant the edge authenticated and a worker answers only that tenant; the edge's client port
//! routes no internal gRPC path. Certificates are made at run time.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tether_common::discovery::NodeKind;
use tether_common::tls::Authority;
use tether_edge::config::AuthMode;
use tether_proto::shard::v1::InfoRequest;
use tether_proto::shard::v1::shard_client::ShardClient;
use tether_proto::worker::v1::worker_client::WorkerClient;
use tether_proto::worker::v1::{FetchStateRequest, ResponseRef, response_body};
use tether_tests::Cluster;
use tether_tests::client::output_text;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

const SANS: [&str; 2] = ["localhost", "127.0.0.1"];

fn sans() -> Vec<String> {
    SANS.map(str::to_owned).to_vec()
}

/// A channel to `addr` (`http://` when `tls` is `None`, else `https://` with `tls`).
fn channel(addr: SocketAddr, tls: Option<ClientTlsConfig>) -> Channel {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint =
        Endpoint::from_shared(format!("{scheme}://{addr}")).unwrap().connect_timeout(Duration::from_secs(2));
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls).unwrap();
    }
    endpoint.connect_lazy()
}

/// Client TLS that trusts the cluster CA and presents `identity` (or nothing).
fn client_tls(cluster_ca: &Authority, identity: Option<(&Authority, &str)>) -> ClientTlsConfig {
    let config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(cluster_ca.cert_pem()));
    match identity {
        Some((issuer, name)) => {
            let issued = issuer.issue(name, &sans()).unwrap();
            config.identity(Identity::from_pem(issued.cert, issued.key))
        }
        None => config,
    }
}

async fn fetch_state(channel: Channel, tenant: &str, id: &str) -> Result<bool, tonic::Status> {
    let mut client = WorkerClient::new(channel);
    let request = FetchStateRequest { tenant: tenant.into(), response_id: id.into() };
    let reply = tokio::time::timeout(Duration::from_secs(10), client.fetch_state(request)).await.expect("no hang")?;
    Ok(reply.into_inner().state.is_some())
}

async fn shard_info(channel: Channel) -> Result<(), tonic::Status> {
    let mut client = ShardClient::new(channel);
    tokio::time::timeout(Duration::from_secs(10), client.info(InfoRequest {})).await.expect("no hang").map(|_| ())
}

/// Whether a call failed in the transport (no connection, a refused handshake), not in the
/// service: a status the server sent has no transport error as its source.
fn is_transport_error(status: &tonic::Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        if error.is::<tonic::transport::Error>() {
            return true;
        }
        source = error.source();
    }
    false
}

async fn create(http: &reqwest::Client, base: &str, key: &str, body: Value) -> Value {
    let reply = http.post(format!("{base}/v1/responses")).bearer_auth(key).json(&body).send().await.unwrap();
    assert_eq!(reply.status(), 200);
    reply.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_with_mutual_tls_serves_chained_turns() {
    let ca = Arc::new(Authority::generate().unwrap());
    let cluster = Cluster::builder().workers(2).shards(2).tls(ca).start().await;
    for kind in [NodeKind::Worker, NodeKind::Shard] {
        for member in cluster.discovery.members(kind).values() {
            assert!(member.addr.starts_with("https://"), "{member:?}");
        }
    }
    let http = reqwest::Client::new();
    let first = create(&http, &cluster.url(), "sk-local", json!({"model": "tether-sim", "input": "hi"})).await;
    assert_eq!(first["status"], "completed");
    assert!(!output_text(&first).is_empty());
    let second = create(
        &http,
        &cluster.url(),
        "sk-local",
        json!({"model": "tether-sim", "input": "and again", "previous_response_id": first["id"]}),
    )
    .await;
    assert_eq!(second["status"], "completed");
    assert!(second["usage"]["input_tokens_details"]["cached_tokens"].as_u64().unwrap() > 0, "{second}");
    let id = second["id"].as_str().unwrap();
    let fetched: Value =
        http.get(format!("{}/v1/responses/{id}", cluster.url())).send().await.unwrap().json().await.unwrap();
    assert_eq!(fetched["id"], id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_and_shards_refuse_clients_without_a_cluster_certificate() {
    let ca = Arc::new(Authority::generate().unwrap());
    let other_ca = Authority::generate().unwrap();
    let cluster = Cluster::builder().workers(1).shards(1).tls(ca.clone()).start().await;
    let http = reqwest::Client::new();
    let response = create(&http, &cluster.url(), "sk-local", json!({"model": "tether-sim", "input": "hi"})).await;
    let id = response["id"].as_str().unwrap();
    let (worker, shard) = (cluster.workers[0].addr, cluster.shards[0].addr);

    // With a certificate from the cluster CA: answered (the state is there).
    let member = || Some(client_tls(&ca, Some((&ca, "ops"))));
    assert!(fetch_state(channel(worker, member()), "default", id).await.unwrap());
    shard_info(channel(shard, member())).await.unwrap();

    // Plaintext, TLS without a client certificate, a certificate from another CA: the
    // handshake fails, every call is a transport error and no data comes back.
    let strangers: [(&str, Option<ClientTlsConfig>); 3] = [
        ("plaintext", None),
        ("no client certificate", Some(client_tls(&ca, None))),
        ("a certificate from another CA", Some(client_tls(&ca, Some((&other_ca, "intruder"))))),
    ];
    for (what, tls) in strangers {
        let status = fetch_state(channel(worker, tls.clone()), "default", id).await.expect_err(what);
        assert!(is_transport_error(&status), "worker, {what}: {status:?}");
        let status = shard_info(channel(shard, tls)).await.expect_err(what);
        assert!(is_transport_error(&status), "shard, {what}: {status:?}");
    }
    // The operations endpoints share the port and its rule: plain HTTP gets nothing.
    for addr in [worker, shard] {
        assert!(http.get(format!("http://{addr}/readyz")).send().await.is_err(), "{addr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_answers_internal_reads_only_for_the_owning_tenant() {
    let ca = Arc::new(Authority::generate().unwrap());
    let cluster = Cluster::builder()
        .workers(2)
        .shards(1)
        .edge_config(|config| {
            config.auth = AuthMode::Keys;
            config.api_keys = [("sk-alpha", "alpha"), ("sk-beta", "beta")].map(|(k, t)| (k.into(), t.into())).into();
        })
        .tls(ca.clone())
        .start()
        .await;
    let http = reqwest::Client::new();
    let response = create(&http, &cluster.url(), "sk-alpha", json!({"model": "tether-sim", "input": "hi"})).await;
    let id = response["id"].as_str().unwrap().to_owned();
    let tls = || Some(client_tls(&ca, Some((&ca, "ops"))));

    // The owner and the replica holder both hold it, for alpha only.
    let mut holders = 0;
    for worker in &cluster.workers {
        if fetch_state(channel(worker.addr, tls()), "alpha", &id).await.unwrap() {
            holders += 1;
        }
        assert!(!fetch_state(channel(worker.addr, tls()), "beta", &id).await.unwrap(), "FetchState as beta");
    }
    assert!(holders >= 1);
    for worker in &cluster.workers {
        let mut client = WorkerClient::new(channel(worker.addr, tls()));
        let as_beta = ResponseRef { tenant: "beta".into(), response_id: id.clone(), local_only: false };
        for reply in [
            client.get_response(as_beta.clone()).await.unwrap().into_inner(),
            client.delete_response(as_beta).await.unwrap().into_inner(),
        ] {
            match reply.kind {
                Some(response_body::Kind::Error(error)) => assert_eq!(error.status, 404, "{error:?}"),
                other => panic!("beta got {other:?}"),
            }
        }
    }
    // Beta's delete removed nothing, and the edge answers beta as it does for any unknown id.
    let reply = http.get(format!("{}/v1/responses/{id}", cluster.url())).bearer_auth("sk-alpha").send().await.unwrap();
    assert_eq!(reply.status(), 200);
    let reply = http.get(format!("{}/v1/responses/{id}", cluster.url())).bearer_auth("sk-beta").send().await.unwrap();
    assert_eq!(reply.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_port_routes_no_internal_grpc_path() {
    let cluster = Cluster::builder().workers(1).shards(1).start().await;
    let http = reqwest::Client::new();
    let response = create(&http, &cluster.url(), "sk-local", json!({"model": "tether-sim", "input": "hi"})).await;
    let id = response["id"].as_str().unwrap();

    // HTTP/1.1 POSTs to the internal services' paths: the protocol's 404.
    for path in [
        "/tether.worker.v1.Worker/FetchState",
        "/tether.worker.v1.Worker/GetResponse",
        "/tether.worker.v1.Worker/Replicate",
        "/tether.shard.v1.Shard/DropSession",
        "/tether.shard.v1.Shard/ImportSession",
    ] {
        let reply = http
            .post(format!("{}{path}", cluster.url()))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(vec![0u8, 0, 0, 0, 0])
            .send()
            .await
            .unwrap();
        assert_eq!(reply.status(), 404, "{path}");
        let body: Value = reply.json().await.unwrap();
        assert_eq!(body["error"]["code"], "not_found", "{path}: {body}");
    }
    // A real gRPC client (HTTP/2) aimed at the edge gets no state either.
    let status = fetch_state(channel(cluster.edges[0].addr, None), "default", id).await.expect_err("edge is no worker");
    assert_ne!(status.code(), tonic::Code::Ok);
}
