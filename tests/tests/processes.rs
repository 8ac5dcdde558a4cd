//! The multi-process suite: real `tether` processes (edge, 3 workers, 2 shards) with
//! membership in a real etcd server on loopback, driven by concurrent agents while nodes are
//! killed (SIGKILL), drained (SIGTERM), added, frozen (SIGSTOP) and while etcd is down.
//! Each scenario asserts its invariants (no lost stored chain, classified failures within a
//! bound, linear histories) and prints the recovery times it saw.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};
use tether_tests::agents::{self, AgentLog};
use tether_tests::client::{self, WsClient};
use tether_tests::etcd::Etcd;
use tether_tests::process::{Process, tether_bin};
use tether_tests::wait;
use tokio_util::sync::CancellationToken;

/// Scenarios start many processes: run them one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const LEASE_TTL: &str = "2s";

struct ProcessCluster {
    etcd: Etcd,
    dir: PathBuf,
    name: String,
    edge: Process,
    workers: Vec<Process>,
    _shards: Vec<Process>,
    /// `tether certs` output when the internal plane speaks mutual TLS.
    certs: Option<PathBuf>,
}

impl ProcessCluster {
    async fn start(name: &str) -> ProcessCluster {
        ProcessCluster::start_with(name, false).await
    }

    /// With `tls`, `tether certs` makes a CA and a certificate per node first, and every node
    /// runs with `--tls-cert/--tls-key/--tls-ca`.
    async fn start_with(name: &str, tls: bool) -> ProcessCluster {
        ProcessCluster::start_full(name, tls, &[]).await
    }

    /// With `shard_args` added to every shard's command line.
    async fn start_full(name: &str, tls: bool, shard_args: &[&str]) -> ProcessCluster {
        tether_common::telemetry::init_for_test();
        let etcd = Etcd::start().await;
        let dir = std::env::temp_dir().join(format!("tether-processes-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut cluster = ProcessCluster {
            etcd,
            dir,
            name: name.to_owned(),
            edge: placeholder(),
            workers: Vec::new(),
            _shards: Vec::new(),
            certs: None,
        };
        if tls {
            let certs = cluster.dir.join("certs");
            let names = "edge,worker-0,worker-1,worker-2,shard-0,shard-1";
            let status = std::process::Command::new(tether_bin())
                .args(["certs", "--out", certs.to_str().unwrap(), "--names", names])
                .stdout(std::process::Stdio::null())
                .status()
                .unwrap();
            assert!(status.success(), "tether certs: {status}");
            cluster.certs = Some(certs);
        }
        for i in 0..2 {
            // The agents chain up to thousands of turns per session (a release build runs ~30 turns/s
            // per agent); the sim's default 32k-token window would refuse the longest chains with
            // context_length_exceeded, which is not what these scenarios test.
            let id = format!("shard-{i}");
            let mut args = vec!["shard", "--id", &id, "--sim-context-window", "4194304"];
            args.extend_from_slice(shard_args);
            let shard = cluster.spawn(&id, &args);
            cluster._shards.push(shard);
        }
        for i in 0..3 {
            let worker = cluster.spawn_worker(&format!("worker-{i}"));
            cluster.workers.push(worker);
        }
        cluster.edge = cluster.spawn("edge", &["edge", "--auth", "open"]);
        cluster.wait_for_members(3, 2).await;
        let ready = format!("{}/readyz", cluster.edge.url());
        wait::until(Duration::from_secs(20), "edge ready", || {
            let ready = ready.clone();
            async move { reqwest::get(&ready).await.ok().filter(|r| r.status().is_success()).map(|_| ()) }
        })
        .await;
        cluster
    }

    fn spawn(&self, name: &str, args: &[&str]) -> Process {
        let mut all: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        all.extend(
            ["--listen", "127.0.0.1:0", "--cluster", &self.name, "--lease-ttl", LEASE_TTL, "--shutdown-grace", "10s"]
                .map(str::to_owned),
        );
        for endpoint in self.etcd.endpoints() {
            all.extend(["--etcd".to_owned(), endpoint]);
        }
        if let Some(certs) = &self.certs {
            let file = |name: &str| certs.join(name).to_str().unwrap().to_owned();
            all.extend(["--tls-cert".to_owned(), file(&format!("{name}.pem"))]);
            all.extend(["--tls-key".to_owned(), file(&format!("{name}.key"))]);
            all.extend(["--tls-ca".to_owned(), file("ca.pem")]);
        }
        Process::start(name, &all, &self.dir)
    }

    fn spawn_worker(&self, id: &str) -> Process {
        self.spawn(id, &["worker", "--id", id])
    }

    fn ws_url(&self) -> String {
        format!("ws://{}/v1/responses", self.edge.addr)
    }

    /// Waits until the edge's view lists `workers` workers and `shards` shards.
    async fn wait_for_members(&self, workers: usize, shards: usize) -> Duration {
        let started = Instant::now();
        let url = format!("{}/v1/cluster", self.edge.url());
        wait::until(Duration::from_secs(20), &format!("{workers} workers and {shards} shards in membership"), || {
            let url = url.clone();
            async move {
                let view: serde_json::Value = reqwest::get(&url).await.ok()?.json().await.ok()?;
                let count = |kind: &str| view[kind].as_array().map_or(0, Vec::len);
                (count("workers") == workers && count("shards") == shards).then_some(())
            }
        })
        .await;
        started.elapsed()
    }

    fn worker_index(&self, id: &str) -> usize {
        self.workers.iter().position(|w| w.name == id).expect("a known worker")
    }
}

fn placeholder() -> Process {
    // Replaced before use; `Process` has no empty state, so start nothing until then.
    Process::placeholder()
}

/// Runs agents until `stop` and returns their logs.
fn start_agents(url: String, agents: usize, stop: CancellationToken) -> tokio::task::JoinHandle<Vec<AgentLog>> {
    tokio::spawn(async move { agents::run(&url, agents, 5_000, stop).await })
}

/// Waits until the agents completed `more` turns beyond `from` (counted through the edge's
/// metrics would couple the test to metric names; the logs are only read at the end, so count
/// completed responses through the worker metric instead).
async fn completed_turns(edge: &Process) -> u64 {
    let text = match reqwest::get(format!("{}/metrics", edge.url())).await {
        Ok(reply) => reply.text().await.unwrap_or_default(),
        Err(_) => return 0,
    };
    text.lines()
        .filter(|l| {
            l.starts_with("tether_edge_requests_total")
                && l.contains("transport=\"websocket\"")
                && l.contains("outcome=\"ok\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

async fn run_turns(edge: &Process, more: u64, what: &str) {
    let from = completed_turns(edge).await;
    wait::until(
        Duration::from_secs(60),
        what,
        || async move { (completed_turns(edge).await >= from + more).then_some(()) },
    )
    .await;
}

fn summary(logs: &[AgentLog]) -> (usize, usize, usize) {
    let turns = logs.iter().map(|l| l.history.len()).sum();
    let failures = logs.iter().map(|l| l.failures.len()).sum();
    let lost = logs.iter().map(|l| l.lost).sum();
    (turns, failures, lost)
}

fn check_histories(logs: &[AgentLog]) {
    for (agent, log) in logs.iter().enumerate() {
        agents::assert_linear(agent, log);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_a_worker_mid_stream() {
    let _serial = SERIAL.lock().await;
    let mut cluster = ProcessCluster::start("kill").await;
    let stop = CancellationToken::new();
    let agents = start_agents(cluster.ws_url(), 12, stop.clone());
    run_turns(&cluster.edge, 60, "turns before the kill").await;

    tracing::info!("--- SIGKILL worker-0");
    let index = cluster.worker_index("worker-0");
    let killed_at = Instant::now();
    cluster.workers[index].kill();
    cluster.wait_for_members(2, 2).await;
    let lease_gone = killed_at.elapsed();
    run_turns(&cluster.edge, 120, "turns after the kill").await;
    stop.cancel();
    let logs = agents.await.unwrap();
    let (turns, failures, lost) = summary(&logs);
    let last_failure = logs.iter().flat_map(|l| &l.failures).map(|f| f.at.saturating_duration_since(killed_at)).max();
    println!(
        "kill: {turns} turns, {failures} failed, {lost} lost; last failure event {last_failure:?} after the kill; lease gone {lease_gone:?} after it"
    );
    assert_eq!(lost, 0, "no stored chain is lost");
    // Turns in flight on the killed worker continue on the next owner.
    assert_eq!(failures, 0, "{:?}", logs.iter().flat_map(|l| &l.failures).collect::<Vec<_>>());
    check_histories(&logs);
    agents::assert_stored(&cluster.edge.url(), &logs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_with_sigterm_fails_no_turn() {
    let _serial = SERIAL.lock().await;
    let mut cluster = ProcessCluster::start("rolling").await;
    let stop = CancellationToken::new();
    let agents = start_agents(cluster.ws_url(), 8, stop.clone());
    run_turns(&cluster.edge, 40, "turns before the restarts").await;
    for i in 0..3 {
        let id = format!("worker-{i}");
        tracing::info!("--- SIGTERM {id}, then start it again");
        let index = cluster.worker_index(&id);
        let drained = Instant::now();
        let status = cluster.workers[index].terminate(Duration::from_secs(15));
        assert!(status.success(), "{id} drained cleanly: {status}");
        println!("rolling: {id} drained in {:?}", drained.elapsed());
        cluster.workers[index] = cluster.spawn_worker(&id);
        cluster.wait_for_members(3, 2).await;
        run_turns(&cluster.edge, 30, "turns after a restart").await;
    }
    stop.cancel();
    let logs = agents.await.unwrap();
    let (turns, failures, lost) = summary(&logs);
    println!("rolling: {turns} turns, {failures} failed, {lost} lost");
    assert_eq!((failures, lost), (0, 0), "{:?}", logs.iter().flat_map(|l| &l.failures).collect::<Vec<_>>());
    check_histories(&logs);
    agents::assert_stored(&cluster.edge.url(), &logs).await;
}

/// Scale-up by two at once: a key that moves to one newcomer may have the other newcomer
/// between it and the key's earlier owner, so the pull must look past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adding_two_workers_at_once_under_load_fails_no_turn() {
    let _serial = SERIAL.lock().await;
    let mut cluster = ProcessCluster::start("scale").await;
    let stop = CancellationToken::new();
    // Many chains, so that some have one newcomer between the other and their earlier owner.
    let agents = start_agents(cluster.ws_url(), 32, stop.clone());
    run_turns(&cluster.edge, 80, "turns before the new workers").await;
    tracing::info!("--- add worker-3 and worker-4");
    for id in ["worker-3", "worker-4"] {
        let worker = cluster.spawn_worker(id);
        cluster.workers.push(worker);
    }
    let joined = cluster.wait_for_members(5, 2).await;
    run_turns(&cluster.edge, 120, "turns after the new workers").await;
    stop.cancel();
    let logs = agents.await.unwrap();
    let (turns, failures, lost) = summary(&logs);
    println!("scale-out: {turns} turns, {failures} failed, {lost} lost; joined the edge's view in {joined:?}");
    assert_eq!((failures, lost), (0, 0));
    check_histories(&logs);
    agents::assert_stored(&cluster.edge.url(), &logs).await;
}

/// Scale-down by two: both workers drain at the same moment, and neither may hand its states
/// to the other (it would leave with them). Every stored chain must survive on the three left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_drained_at_once_lose_no_chain() {
    let _serial = SERIAL.lock().await;
    let mut cluster = ProcessCluster::start("scale-down").await;
    for id in ["worker-3", "worker-4"] {
        let worker = cluster.spawn_worker(id);
        cluster.workers.push(worker);
    }
    cluster.wait_for_members(5, 2).await;
    let stop = CancellationToken::new();
    // Enough chains that some have each drained worker as the other's next owner.
    let agents = start_agents(cluster.ws_url(), 24, stop.clone());
    run_turns(&cluster.edge, 150, "turns on five workers").await;

    tracing::info!("--- SIGTERM worker-1 and worker-3 together");
    let drained = Instant::now();
    let (first, second) = (cluster.worker_index("worker-1"), cluster.worker_index("worker-3"));
    cluster.workers[first].begin_terminate();
    cluster.workers[second].begin_terminate();
    for index in [first, second] {
        let status = cluster.workers[index].wait_exit(Duration::from_secs(15));
        assert!(status.success(), "{} drained cleanly: {status}", cluster.workers[index].name);
    }
    let took = drained.elapsed();
    cluster.wait_for_members(3, 2).await;
    let report = [first, second].map(|index| {
        let log = cluster.workers[index].log_text();
        let field = |message: &str, name: &str| {
            log.lines()
                .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
                .filter(|entry| entry["fields"]["message"] == message)
                .map(|entry| entry["fields"][name].to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        let refused = log.matches("hand-off batch refused").count();
        format!(
            "{} handed off {} states ({refused} batches refused by the other drainer)",
            cluster.workers[index].name,
            field("sessions handed off", "handed_off")
        )
    });
    run_turns(&cluster.edge, 100, "turns on the three left").await;
    stop.cancel();
    let logs = agents.await.unwrap();
    let (turns, failures, lost) = summary(&logs);
    println!("scale-down: {turns} turns, {failures} failed, {lost} lost; both drained in {took:?}; {report:?}");
    assert_eq!((failures, lost), (0, 0), "{:?}", logs.iter().flat_map(|l| &l.failures).collect::<Vec<_>>());
    check_histories(&logs);
    agents::assert_stored(&cluster.edge.url(), &logs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_down_for_30_seconds_costs_no_turn() {
    let _serial = SERIAL.lock().await;
    let mut cluster = ProcessCluster::start("etcd-down").await;
    let stop = CancellationToken::new();
    let agents = start_agents(cluster.ws_url(), 6, stop.clone());
    run_turns(&cluster.edge, 30, "turns before the outage").await;
    tracing::info!("--- stop etcd for 30 s");
    cluster.etcd.kill();
    let before = completed_turns(&cluster.edge).await;
    // The outage itself lasts 30 s (a scenario length, not a wait for some state).
    tokio::time::sleep(Duration::from_secs(30)).await;
    let during = completed_turns(&cluster.edge).await - before;
    cluster.etcd.restart().await;
    run_turns(&cluster.edge, 30, "turns after etcd is back").await;
    stop.cancel();
    let logs = agents.await.unwrap();
    let (turns, failures, lost) = summary(&logs);
    println!("etcd outage: {turns} turns ({during} during the 30 s outage), {failures} failed, {lost} lost");
    assert!(during > 100, "turns kept flowing from the last known membership");
    assert_eq!((failures, lost), (0, 0));
    check_histories(&logs);
}

/// etcd frozen (SIGSTOP) for three lease TTLs under load: it keeps its lease clocks running, so
/// when it resumes it revokes every lease at once. The nodes that kept running register again
/// without fencing, and the edge holds the departures it sees come with the resumption (whether
/// it sees any depends on whether its first listing after the freeze comes before the workers
/// registered again): no turn fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_frozen_past_the_lease_ttl_fences_nobody() {
    let _serial = SERIAL.lock().await;
    let cluster = ProcessCluster::start("etcd-freeze").await;
    let stop = CancellationToken::new();
    let agents = start_agents(cluster.ws_url(), 6, stop.clone());
    run_turns(&cluster.edge, 30, "turns before the freeze").await;
    tracing::info!("--- SIGSTOP etcd for 6 s (3 lease TTLs)");
    cluster.etcd.pause();
    // The freeze itself lasts 6 s (a scenario length, not a wait for some state).
    tokio::time::sleep(Duration::from_secs(6)).await;
    cluster.etcd.resume();
    let reregistered = |node: &Process, fenced: &'static str| {
        let url = node.url();
        async move {
            let text = reqwest::get(format!("{url}/metrics")).await.ok()?.text().await.ok()?;
            let label = format!("fenced=\"{fenced}\"");
            Some(
                text.lines()
                    .filter(|l| l.starts_with("tether_membership_reregistrations_total") && l.contains(&label))
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                    .sum::<f64>(),
            )
        }
    };
    for worker in &cluster.workers {
        wait::until(
            Duration::from_secs(20),
            &format!("{} registered again after etcd resumed", worker.name),
            || async { (reregistered(worker, "false").await? >= 1.0).then_some(()) },
        )
        .await;
    }
    run_turns(&cluster.edge, 60, "turns after etcd resumed").await;
    stop.cancel();
    let logs = agents.await.unwrap();
    let (turns, failures, lost) = summary(&logs);
    let held = tether_tests::scrape::metric_sum(&cluster.edge.url(), "tether_membership_held_departures_total").await;
    println!("etcd freeze: {turns} turns, {failures} failed, {lost} lost; the edge held {held} departures");
    for worker in &cluster.workers {
        assert_eq!(reregistered(worker, "true").await, Some(0.0), "{} was never fenced", worker.name);
    }
    assert_eq!((failures, lost), (0, 0), "{:?}", logs.iter().flat_map(|l| &l.failures).collect::<Vec<_>>());
    check_histories(&logs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_worker_never_makes_two_owners() {
    let _serial = SERIAL.lock().await;
    let cluster = ProcessCluster::start("freeze").await;
    let stop = CancellationToken::new();
    let agents = start_agents(cluster.ws_url(), 8, stop.clone());
    run_turns(&cluster.edge, 40, "turns before the freeze").await;
    tracing::info!("--- SIGSTOP worker-1 past its lease, then SIGCONT");
    let index = cluster.worker_index("worker-1");
    let frozen_at = Instant::now();
    cluster.workers[index].freeze();
    let expired = cluster.wait_for_members(2, 2).await;
    run_turns(&cluster.edge, 40, "turns while worker-1 is frozen").await;
    cluster.workers[index].thaw();
    let rejoined = cluster.wait_for_members(3, 2).await;
    run_turns(&cluster.edge, 60, "turns after the thaw").await;
    stop.cancel();
    let logs = agents.await.unwrap();
    let (turns, failures, lost) = summary(&logs);
    println!(
        "freeze: {turns} turns, {failures} failed, {lost} lost; lease expired {expired:?} after SIGSTOP, rejoined {rejoined:?} after SIGCONT ({:?} total)",
        frozen_at.elapsed()
    );
    assert_eq!(lost, 0);
    check_histories(&logs);
    agents::assert_stored(&cluster.edge.url(), &logs).await;
}

/// The internal plane with mutual TLS, real processes: certificates from `tether certs`, the
/// TLS flags on every node, members advertised as `https://`; agent loops run, a worker drains
/// (its hand-off and the replicas travel worker to worker over mTLS) and no turn fails.
/// Half the flags, or a plaintext peer address in a TLS cluster, is a configuration error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_between_processes_serves_and_drains() {
    let _serial = SERIAL.lock().await;
    let mut cluster = ProcessCluster::start_with("mtls", true).await;
    let certs = cluster.certs.clone().unwrap();
    let view: serde_json::Value =
        reqwest::get(format!("{}/v1/cluster", cluster.edge.url())).await.unwrap().json().await.unwrap();
    let text = view.to_string();
    assert!(text.contains("https://127.0.0.1:") && !text.contains("http://127.0.0.1:"), "{view}");

    let stop = CancellationToken::new();
    let agents = start_agents(cluster.ws_url(), 6, stop.clone());
    run_turns(&cluster.edge, 40, "turns over mutual TLS").await;
    let index = cluster.worker_index("worker-0");
    let status = cluster.workers[index].terminate(Duration::from_secs(15));
    assert!(status.success(), "worker-0 drained cleanly: {status}");
    cluster.wait_for_members(2, 2).await;
    run_turns(&cluster.edge, 30, "turns after the drain").await;
    stop.cancel();
    let logs = agents.await.unwrap();
    let (turns, failures, lost) = summary(&logs);
    println!("mtls: {turns} turns, {failures} failed, {lost} lost");
    assert_eq!((failures, lost), (0, 0), "{:?}", logs.iter().flat_map(|l| &l.failures).collect::<Vec<_>>());
    check_histories(&logs);
    agents::assert_stored(&cluster.edge.url(), &logs).await;

    let file = |name: &str| certs.join(name).to_str().unwrap().to_owned();
    let (cert, key, ca) = (file("worker-0.pem"), file("worker-0.key"), file("ca.pem"));
    let misconfigured: [Vec<&str>; 3] = [
        vec!["worker", "--tls-cert", &cert],
        vec!["worker", "--tls-cert", &cert, "--tls-key", &key],
        vec!["worker", "--tls-cert", &cert, "--tls-key", &key, "--tls-ca", &ca, "--shard-peer", "s=http://127.0.0.1:1"],
    ];
    for args in misconfigured {
        let status = std::process::Command::new(tether_bin())
            .args(&args)
            .args(["--listen", "127.0.0.1:0"])
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert_eq!(status.code(), Some(64), "{args:?}");
    }
}

/// How a test takes the worker of the streams in flight away.
#[derive(Clone, Copy, Debug)]
enum Fault {
    Kill,
    Freeze,
    /// SIGKILL the shard generating the responses (their worker lives on).
    KillShard,
}

/// One long streamed response, as its client saw it.
struct Streamed {
    events: Vec<Value>,
    /// When each event arrived.
    at: Vec<Instant>,
}

impl Streamed {
    fn deltas(&self) -> String {
        self.events
            .iter()
            .filter(|e| e["type"] == "response.output_text.delta")
            .filter_map(|e| e["delta"].as_str())
            .collect()
    }

    /// The client's view is one response: one id, `sequence_number` 0..n, no duplicated or
    /// missing delta (they concatenate to the final text), a normal `response.completed`.
    fn check(&self, what: &str) -> &Value {
        let numbers: Vec<u64> = self.events.iter().map(|e| e["sequence_number"].as_u64().unwrap()).collect();
        assert_eq!(numbers, (0..numbers.len() as u64).collect::<Vec<_>>(), "{what}: sequence numbers");
        let last = self.events.last().unwrap();
        assert_eq!(last["type"], "response.completed", "{what}: {last}");
        let id = &self.events[0]["response"]["id"];
        for event in &self.events {
            if let Some(response) = event.get("response") {
                assert_eq!(&response["id"], id, "{what}: one response id");
            }
        }
        let created = self.events.iter().filter(|e| e["type"] == "response.created").count();
        assert_eq!(created, 1, "{what}: one response.created");
        let response = &last["response"];
        assert_eq!(self.deltas(), client::output_text(response), "{what}: deltas concatenate to the text");
        response
    }

    /// The stall the fault caused: the longest wait for a delta after it (from the fault, or
    /// from the previous delta).
    fn stall_after(&self, fault: Instant) -> Duration {
        let mut previous = fault;
        let mut longest = Duration::ZERO;
        for (event, at) in self.events.iter().zip(&self.at) {
            if *at > fault && event["type"] == "response.output_text.delta" {
                longest = longest.max(at.saturating_duration_since(previous));
                previous = *at;
            }
        }
        longest
    }
}

/// Streams `body` over a new WebSocket, telling `started` after the first `deltas` deltas.
async fn stream_ws(url: String, body: Value, deltas: usize, started: tokio::sync::mpsc::Sender<()>) -> Streamed {
    let mut ws = WsClient::connect(&url, None).await.expect("connect");
    let mut event = json!({"type": "response.create"});
    event.as_object_mut().unwrap().extend(body.as_object().unwrap().clone());
    ws.send(&event).await;
    let mut streamed = Streamed { events: Vec::new(), at: Vec::new() };
    loop {
        let event = ws.recv().await;
        let done = client::is_terminal(&event);
        streamed.events.push(event);
        streamed.at.push(Instant::now());
        if streamed.events.len() == deltas + 4 {
            let _ = started.send(()).await;
        }
        if done {
            return streamed;
        }
    }
}

/// The same over HTTP SSE.
async fn stream_sse(url: String, mut body: Value, deltas: usize, started: tokio::sync::mpsc::Sender<()>) -> Streamed {
    body["stream"] = json!(true);
    let reply = reqwest::Client::new().post(format!("{url}/v1/responses")).json(&body).send().await.expect("post");
    assert!(reply.status().is_success(), "{}", reply.status());
    let mut bytes = reply.bytes_stream();
    let mut buffer = String::new();
    let mut streamed = Streamed { events: Vec::new(), at: Vec::new() };
    while let Some(chunk) = bytes.next().await {
        buffer.push_str(std::str::from_utf8(&chunk.expect("the body streams")).unwrap());
        while let Some(end) = buffer.find("\n\n") {
            let frame: String = buffer.drain(..end + 2).collect();
            let Some(data) = frame.lines().find_map(|l| l.strip_prefix("data: ")) else { continue };
            streamed.events.push(serde_json::from_str(data).expect("SSE data is JSON"));
            streamed.at.push(Instant::now());
            if streamed.events.len() == deltas + 4 {
                let _ = started.send(()).await;
            }
        }
    }
    streamed
}

/// Long responses streaming from a worker that is SIGKILLed or SIGSTOPped continue on the
/// key's next owner, and from a SIGKILLed shard on the next shard: each client sees one
/// response, exactly the text an undisturbed run produces, with no failed turn.
async fn streams_in_flight_survive(fault: Fault) {
    let _serial = SERIAL.lock().await;
    let name = format!("resume-{fault:?}").to_lowercase();
    // 200 tokens/s: a 1,000-token answer streams for ~5 s, the fault lands in its middle.
    let mut cluster = ProcessCluster::start_full(&name, false, &["--sim-decode-tps", "200"]).await;
    let (role, victim) = match fault {
        Fault::KillShard => ("shard", "shard-0"),
        Fault::Kill | Fault::Freeze => ("worker", "worker-0"),
    };

    // Chains whose key worker-0 owns: short first turns until three land there.
    let mut parents = Vec::new();
    for i in 0..60 {
        // A WebSocket connection keeps its first turn's key: one connection per chain.
        let mut ws = WsClient::connect(&cluster.ws_url(), None).await.unwrap();
        let events = ws
            .create(json!({"model": "tether-sim", "input": format!("chain {i}"), "metadata": {"tether_sim_output_tokens": "4"}}))
            .await;
        let response = client::final_response(&events);
        if response["x_tether"][role] == victim {
            parents.push(response["id"].as_str().unwrap().to_owned());
        }
        if parents.len() == 3 {
            break;
        }
    }
    assert_eq!(parents.len(), 3, "three chains on {victim}");
    let long = |parent: &str| {
        json!({"model": "tether-sim", "previous_response_id": parent, "input": "go on",
               "metadata": {"tether_sim_output_tokens": "1000"}})
    };

    // Two WebSocket streams and one SSE stream; the fault comes once each has 20 deltas.
    let (started, mut ready) = tokio::sync::mpsc::channel(3);
    let streams = vec![
        tokio::spawn(stream_ws(cluster.ws_url(), long(&parents[0]), 20, started.clone())),
        tokio::spawn(stream_ws(cluster.ws_url(), long(&parents[1]), 20, started.clone())),
        tokio::spawn(stream_sse(cluster.edge.url(), long(&parents[2]), 20, started)),
    ];
    for _ in 0..3 {
        wait::within(Duration::from_secs(30), "streams under way", ready.recv()).await;
    }
    tracing::info!("--- {fault:?} {victim} with three responses streaming from it");
    let index = match fault {
        Fault::KillShard => cluster._shards.iter().position(|s| s.name == victim).unwrap(),
        Fault::Kill | Fault::Freeze => cluster.worker_index(victim),
    };
    let fault_at = Instant::now();
    match fault {
        Fault::Kill => cluster.workers[index].kill(),
        Fault::Freeze => cluster.workers[index].freeze(),
        Fault::KillShard => cluster._shards[index].kill(),
    }
    let mut seen = Vec::new();
    for stream in streams {
        seen.push(wait::within(Duration::from_secs(60), "the streams end", stream).await.unwrap());
    }
    let stalls: Vec<Duration> = seen.iter().map(|s| s.stall_after(fault_at)).collect();
    println!("{name}: longest wait for a delta after the fault {stalls:?}");

    // The undisturbed run: the same request again (the same parent, the same input).
    let mut ws = WsClient::connect(&cluster.ws_url(), None).await.unwrap();
    for (i, streamed) in seen.iter().enumerate() {
        let response = streamed.check(&format!("stream {i}"));
        let reference = ws.create(long(&parents[i])).await;
        let reference = client::final_response(&reference);
        assert_eq!(reference["status"], "completed");
        assert_eq!(client::output_text(response), client::output_text(reference), "stream {i}: the same text");
        assert_eq!(response["usage"]["output_tokens"], reference["usage"]["output_tokens"], "stream {i}");
        assert_ne!(response["x_tether"][role], victim, "stream {i} ended elsewhere");
    }
    if let Fault::Kill | Fault::Freeze = fault {
        let resumed =
            tether_tests::scrape::metric_sum(&cluster.edge.url(), "tether_edge_responses_resumed_total").await;
        assert!(resumed >= 3.0, "three responses continued ({resumed})");
    }
    let failed =
        tether_tests::scrape::metric_sum(&cluster.edge.url(), "tether_edge_responses_failed_midstream_total").await;
    assert_eq!(failed, 0.0);
    if let Fault::Freeze = fault {
        cluster.workers[index].thaw();
    }
    // Each continued response is stored, completed, under its id, and continues.
    for streamed in &seen {
        let response = &streamed.events.last().unwrap()["response"];
        let id = response["id"].as_str().unwrap();
        let stored: Value =
            reqwest::get(format!("{}/v1/responses/{id}", cluster.edge.url())).await.unwrap().json().await.unwrap();
        assert_eq!(stored["status"], "completed", "{stored}");
        assert_eq!(client::output_text(&stored), client::output_text(response));
        // What is stored is the copy the client saw, never a late one of the stopped worker.
        assert_eq!(stored["x_tether"]["worker"], response["x_tether"]["worker"], "{id}");
        let next = ws.create(json!({"model": "tether-sim", "previous_response_id": id, "input": "thanks"})).await;
        assert_eq!(client::final_response(&next)["status"], "completed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_in_flight_on_a_killed_worker_continue_elsewhere() {
    streams_in_flight_survive(Fault::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_in_flight_on_a_frozen_worker_continue_elsewhere() {
    streams_in_flight_survive(Fault::Freeze).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_in_flight_on_a_killed_shard_continue_on_another() {
    streams_in_flight_survive(Fault::KillShard).await;
}
