//! Worker failure, scale-out and drain in the in-process cluster: no completed store=true
//! turn is lost, a streaming turn whose worker dies continues on the next owner, and turns that
//! had not started move transparently.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tether_common::discovery::NodeKind;
use tether_tests::Cluster;
use tether_tests::client::{WsClient, cached_tokens, final_response, output_text};
use tether_tests::wait;

async fn post(http: &reqwest::Client, base: &str, body: Value) -> (u16, Value) {
    let reply = http.post(format!("{base}/v1/responses")).json(&body).send().await.unwrap();
    let status = reply.status().as_u16();
    (status, reply.json().await.unwrap())
}

fn worker_of(response: &Value) -> String {
    response["x_tether"]["worker"].as_str().expect("x_tether.worker").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_stream_is_continued_elsewhere_and_the_chain_goes_on() {
    let mut cluster =
        Cluster::builder().shard_config(|c| c.sim.decode_interval = Duration::from_millis(5)).start().await;
    let mut ws = WsClient::connect(&cluster.ws_url(), None).await.unwrap();
    let first = ws.create(json!({"input": "start", "metadata": {"tether_sim_output_tokens": "4"}})).await;
    let first = final_response(&first).clone();
    let owner = worker_of(&first);

    tracing::info!("--- stream a long answer, kill its worker after the first delta");
    ws.send(&json!({"type": "response.create", "previous_response_id": first["id"], "input": "long answer",
                    "metadata": {"tether_sim_output_tokens": "400"}}))
        .await;
    let mut events = Vec::new();
    loop {
        let event = ws.recv().await;
        assert_ne!(event["type"], "response.completed");
        let delta = event["type"] == "response.output_text.delta";
        events.push(event);
        if delta {
            break;
        }
    }
    cluster.worker(&owner).kill();
    events.extend(ws.until_terminal().await);
    let terminal = events.last().unwrap();
    // The response continued on the next owner: one response, no truncated or failed end.
    assert_eq!(terminal["type"], "response.completed", "{terminal}");
    let response = &terminal["response"];
    assert_eq!(response["id"], events[0]["response"]["id"]);
    assert_ne!(worker_of(response), owner, "finished elsewhere");
    let numbers: Vec<u64> = events.iter().map(|e| e["sequence_number"].as_u64().unwrap()).collect();
    assert_eq!(numbers, (0..events.len() as u64).collect::<Vec<_>>());
    let deltas: String = events.iter().filter_map(|e| e["delta"].as_str()).collect();
    assert_eq!(deltas, output_text(response));
    assert_eq!(response["usage"]["output_tokens"], 400);

    tracing::info!("--- the same connection continues the chain from the continued response");
    let next = ws.create(json!({"previous_response_id": response["id"], "input": "again", "metadata": {"tether_sim_output_tokens": "4"}})).await;
    let next = final_response(&next);
    assert_eq!(next["status"], "completed");
    assert_ne!(worker_of(next), owner);
    assert_eq!(next["previous_response_id"], response["id"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_stored_chain_survives_a_crash_and_unstarted_turns_move_transparently() {
    let mut cluster = Cluster::builder().start().await;
    let http = reqwest::Client::new();
    let mut heads = Vec::new();
    for i in 0..24 {
        let (status, response) = post(&http, &cluster.url(), json!({"input": format!("chain {i}")})).await;
        assert_eq!(status, 200);
        heads.push(response);
    }
    let victim = worker_of(&heads[0]);
    let owned = heads.iter().filter(|h| worker_of(h) == victim).count();
    tracing::info!("--- kill {victim} (it owns {owned} chains); membership still lists it");
    cluster.worker(&victim).kill();
    let mut moved = 0;
    for head in &mut heads {
        let (status, next) =
            post(&http, &cluster.url(), json!({"previous_response_id": head["id"], "input": "continue"})).await;
        assert_eq!(status, 200, "no stored chain is lost: {next}");
        assert_eq!(next["previous_response_id"], head["id"]);
        if worker_of(head) == victim {
            assert_ne!(worker_of(&next), victim);
            moved += 1;
        }
        *head = next;
    }
    assert_eq!(moved, owned);
    assert!(owned > 0);
    tracing::info!("--- the lease expires: membership agrees with the data plane");
    cluster.discovery.expire(NodeKind::Worker, &victim);
    for head in &heads {
        let (status, _) =
            post(&http, &cluster.url(), json!({"previous_response_id": head["id"], "input": "more"})).await;
        assert_eq!(status, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_false_chain_whose_owner_died_is_not_found() {
    let mut cluster = Cluster::builder().start().await;
    let mut ws = WsClient::connect(&cluster.ws_url(), None).await.unwrap();
    let events = ws.create(json!({"input": "ephemeral", "store": false})).await;
    let response = final_response(&events).clone();
    cluster.worker(&worker_of(&response)).kill();
    let events = ws.create(json!({"previous_response_id": response["id"], "input": "more", "store": false})).await;
    assert_eq!(events[0]["type"], "error");
    assert_eq!(events[0]["error"]["code"], "previous_response_not_found", "store=false state is never copied");
    let events = ws.create(json!({"input": "a fresh chain works"})).await;
    assert_eq!(final_response(&events)["status"], "completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_worker_takes_keys_and_pulls_moved_chains() {
    let mut cluster = Cluster::builder().workers(2).start().await;
    let http = reqwest::Client::new();
    let mut heads = Vec::new();
    for i in 0..30 {
        let (_, response) = post(&http, &cluster.url(), json!({"input": format!("chain {i}")})).await;
        heads.push(response);
    }
    tracing::info!("--- add worker-new");
    cluster.add_worker("worker-new").await;
    let mut moved = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    for head in &heads {
        let (status, next) =
            post(&http, &cluster.url(), json!({"previous_response_id": head["id"], "input": "continue"})).await;
        assert_eq!(status, 200, "moved chains resolve by pull: {next}");
        assert!(!output_text(&next).is_empty());
        if worker_of(&next) == "worker-new" {
            moved += 1;
            assert!(cached_tokens(&next) > 0 || worker_of(head) != worker_of(&next), "usage is reported");
        }
    }
    assert!(Instant::now() < deadline);
    assert!(moved > 0, "the new worker took part of the key space");
    println!("{moved} of {} chains moved to the new worker", heads.len());
}

/// A chain that moved to a new worker has copies on its earlier owner and that owner's replica
/// holder; a DELETE must remove them all, or the next pull brings the response back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_response_stays_deleted_after_its_chain_moved() {
    let mut cluster = Cluster::builder().workers(2).start().await;
    let http = reqwest::Client::new();
    let mut ids = Vec::new();
    for i in 0..30 {
        let (status, response) = post(&http, &cluster.url(), json!({"input": format!("chain {i}")})).await;
        assert_eq!(status, 200);
        ids.push(response["id"].as_str().unwrap().to_owned());
    }
    cluster.add_worker("worker-new").await;
    let url = |id: &str| format!("{}/v1/responses/{id}", cluster.url());
    for id in &ids {
        assert_eq!(http.get(url(id)).send().await.unwrap().status(), 200, "{id} resolves (by pull if it moved)");
        assert_eq!(http.delete(url(id)).send().await.unwrap().status(), 200, "{id} deleted");
    }
    for id in &ids {
        let reply = http.get(url(id)).send().await.unwrap();
        assert_eq!(reply.status(), 404, "{id} came back after its DELETE");
        let (status, body) = post(&http, &cluster.url(), json!({"previous_response_id": id, "input": "more"})).await;
        assert_eq!((status, body["error"]["code"].as_str()), (400, Some("previous_response_not_found")));
    }
}

/// Two workers crash at once, both standing right after a chain's owner on the ring: the
/// owner's next replication meets two dead holders before a live one. The state must still
/// get a replica, so the chain survives when its owner dies next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_finds_a_replica_past_two_dead_successors() {
    let mut cluster = Cluster::builder().workers(4).start().await;
    let http = reqwest::Client::new();
    let ids: Vec<String> = cluster.workers.iter().map(|w| w.id.clone()).collect();
    let ring =
        tether_common::placement::Ring::new(ids.iter().map(String::as_str), tether_common::placement::DEFAULT_VNODES);
    let (status, head) = post(&http, &cluster.url(), json!({"input": "a chain"})).await;
    assert_eq!(status, 200);
    let key = tether_common::ResponseId::parse(head["id"].as_str().unwrap()).unwrap().session_key().0;
    let walk: Vec<String> = ring.walk(key).map(str::to_owned).collect();
    assert_eq!(walk[0], worker_of(&head), "the test computes the ring the cluster uses");
    let (owner, dead, last) = (&walk[0], &walk[1..3], &walk[3]);

    tracing::info!("--- crash {dead:?}: membership still lists them");
    for id in dead {
        cluster.worker(id).kill();
    }
    let (status, next) = post(&http, &cluster.url(), json!({"previous_response_id": head["id"], "input": "on"})).await;
    assert_eq!((status, worker_of(&next)), (200, owner.clone()));

    tracing::info!("--- crash the owner too; only {last} is left");
    cluster.worker(owner).kill();
    for id in walk[..3].iter() {
        cluster.discovery.expire(NodeKind::Worker, id);
    }
    let (status, after) =
        post(&http, &cluster.url(), json!({"previous_response_id": next["id"], "input": "more"})).await;
    assert_eq!(status, 200, "the state made after two holders died has a replica: {after}");
    assert_eq!(worker_of(&after), *last);
}

fn placeholder() -> tether_tests::Node {
    tether_tests::Node::idle("drained")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_a_worker_under_load_fails_no_turn() {
    let mut cluster = Cluster::builder().start().await;
    let url = cluster.url();
    let stop = tokio_util::sync::CancellationToken::new();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut agents = tokio::task::JoinSet::new();
    for agent in 0..8 {
        let (url, stop, done) = (url.clone(), stop.clone(), done.clone());
        agents.spawn(async move {
            let http = reqwest::Client::new();
            let (status, mut head) = post(&http, &url, json!({"input": format!("agent {agent}")})).await;
            assert_eq!(status, 200);
            let mut turns = 1;
            while !stop.is_cancelled() && turns < 200 {
                let (status, next) =
                    post(&http, &url, json!({"previous_response_id": head["id"], "input": "go on"})).await;
                assert_eq!(status, 200, "agent {agent} turn {turns}: {next}");
                head = next;
                turns += 1;
                done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            turns
        });
    }
    let turns_done = || done.load(std::sync::atomic::Ordering::Relaxed);
    wait::until(Duration::from_secs(10), "turns before the drain", || {
        let n = turns_done();
        async move { (n >= 40).then_some(()) }
    })
    .await;
    tracing::info!("--- drain worker-0 gracefully");
    let worker = std::mem::replace(cluster.worker("worker-0"), placeholder());
    let drain = tokio::task::spawn_blocking(move || {
        let mut worker = worker;
        worker.shutdown()
    });
    let before = turns_done();
    drain.await.unwrap().expect("the drain finishes within its deadline");
    wait::until(Duration::from_secs(20), "turns after the drain", || {
        let n = turns_done();
        async move { (n >= before + 80).then_some(()) }
    })
    .await;
    stop.cancel();
    let mut total = 0;
    while let Some(turns) = agents.join_next().await {
        total += turns.expect("no agent saw a failed turn");
    }
    assert!(total > 8);
    println!("{total} turns, 0 failed, across a drain");
}
