//! Agents for the failure scenarios: each keeps one WebSocket and one conversation going,
//! continuing from its last completed response, and records what it saw. The invariants are
//! checked afterwards: no lost chain, every failure classified, every chain linear.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::client::{Received, WsClient};

/// One turn that did not complete.
#[derive(Debug, Clone)]
pub struct Failure {
    pub agent: usize,
    pub at: Instant,
    /// `response.failed:<code>`, `error:<code>`, `closed`, ...
    pub kind: String,
}

#[derive(Debug, Default)]
pub struct AgentLog {
    /// Completed responses in order: (id, previous_response_id).
    pub history: Vec<(String, Option<String>)>,
    pub failures: Vec<Failure>,
    /// Chains that could not be continued (`previous_response_not_found`).
    pub lost: usize,
}

/// Runs `agents` agents against `ws_url` until `stop` (each at most `max_turns` turns).
pub async fn run(ws_url: &str, agents: usize, max_turns: usize, stop: CancellationToken) -> Vec<AgentLog> {
    let mut tasks = tokio::task::JoinSet::new();
    for agent in 0..agents {
        let (url, stop) = (ws_url.to_owned(), stop.clone());
        tasks.spawn(async move { (agent, run_one(agent, &url, max_turns, stop).await) });
    }
    let mut logs: Vec<(usize, AgentLog)> = Vec::new();
    while let Some(result) = tasks.join_next().await {
        logs.push(result.expect("agent task"));
    }
    logs.sort_by_key(|(agent, _)| *agent);
    logs.into_iter().map(|(_, log)| log).collect()
}

async fn run_one(agent: usize, url: &str, max_turns: usize, stop: CancellationToken) -> AgentLog {
    let mut log = AgentLog::default();
    let mut ws: Option<WsClient> = None;
    let mut head: Option<String> = None;
    for turn in 0..max_turns {
        if stop.is_cancelled() {
            break;
        }
        let client = match &mut ws {
            Some(client) => client,
            None => match WsClient::connect(url, None).await {
                Ok(client) => ws.insert(client),
                Err(_) => {
                    log.failures.push(Failure { agent, at: Instant::now(), kind: "connect".into() });
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let body = json!({"type": "response.create", "model": "tether-sim", "previous_response_id": head,
                          "input": format!("agent {agent} turn {turn}"), "metadata": {"tether_sim_output_tokens": "24"}});
        client.send(&body).await;
        let terminal = loop {
            match client.receive().await {
                Received::Event(event) if crate::client::is_terminal(&event) => break Some(event),
                Received::Event(_) => {}
                Received::Closed(_) => break None,
            }
        };
        let Some(event) = terminal else {
            log.failures.push(Failure { agent, at: Instant::now(), kind: "closed".into() });
            ws = None;
            continue;
        };
        match event["type"].as_str() {
            Some("response.completed") => {
                let id = event["response"]["id"].as_str().expect("response id").to_owned();
                let previous = event["response"]["previous_response_id"].as_str().map(str::to_owned);
                log.history.push((id.clone(), previous));
                head = Some(id);
            }
            Some("error") if event["error"]["code"] == "previous_response_not_found" => {
                log.lost += 1;
                head = None;
            }
            Some(kind) => {
                let code =
                    event["response"]["error"]["code"].as_str().or(event["error"]["code"].as_str()).unwrap_or("");
                log.failures.push(Failure { agent, at: Instant::now(), kind: format!("{kind}:{code}") });
            }
            None => unreachable!("terminal events have a type"),
        }
    }
    log
}

/// Checks one agent's chain: each completed response continues the one before it.
pub fn assert_linear(agent: usize, log: &AgentLog) {
    let mut expected: Option<&str> = None;
    for (index, (id, previous)) in log.history.iter().enumerate() {
        if index > 0 || previous.is_some() {
            assert_eq!(previous.as_deref(), expected, "agent {agent}: turn {index} does not continue its chain");
        }
        expected = Some(id);
    }
    let mut seen = std::collections::HashSet::new();
    assert!(log.history.iter().all(|(id, _)| seen.insert(id)), "agent {agent}: a response id repeats");
}

/// Walks every agent's chain back from its head through `GET /v1/responses/{id}`: every
/// completed response is still stored, with the parent the agent saw.
pub async fn assert_stored(base: &str, logs: &[AgentLog]) {
    let http = reqwest::Client::new();
    for (agent, log) in logs.iter().enumerate() {
        for (id, previous) in &log.history {
            let reply = http.get(format!("{base}/v1/responses/{id}")).send().await.expect("retrieve");
            assert_eq!(reply.status(), 200, "agent {agent}: {id} was lost");
            let body: Value = reply.json().await.expect("json");
            assert_eq!(
                body["previous_response_id"].as_str(),
                previous.as_deref(),
                "agent {agent}: {id} has another parent"
            );
        }
    }
}
