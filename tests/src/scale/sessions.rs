//! The sessions of a scale run: created and continued over the edge's HTTP API, a bounded
//! number at a time, each turn with its own timeout. A session is its latest `store=true`
//! response (the next turn continues from it), the key the edge routes it by, and the worker
//! that served its latest turn.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};
use tether_common::ids::ResponseId;

/// How long one turn may take before it counts as failed.
pub const TURN_LIMIT: Duration = Duration::from_secs(30);

#[derive(Clone, Debug)]
pub struct Session {
    /// The latest response of the chain.
    pub id: String,
    /// The session key every response of the chain carries.
    pub key: u64,
    /// The worker that served the latest turn.
    pub worker: Arc<str>,
}

/// One turn's outcome: the new response id and its worker, or why it failed.
pub type TurnResult = Result<(String, Arc<str>), String>;

/// Runs turns against one edge over HTTP.
#[derive(Clone)]
pub struct Driver {
    http: reqwest::Client,
    url: String,
    output_tokens: u32,
}

impl Driver {
    pub fn new(edge: &str, output_tokens: u32) -> Self {
        let http = reqwest::Client::builder()
            .timeout(TURN_LIMIT)
            .pool_max_idle_per_host(1024)
            .build()
            .expect("an HTTP client");
        Driver { http, url: format!("{edge}/v1/responses"), output_tokens }
    }

    /// One `store=true` turn, continuing `previous` when given.
    pub async fn turn(&self, previous: Option<&str>) -> TurnResult {
        let mut body = json!({
            "input": "hello there",
            "store": true,
            "metadata": {"tether_sim_output_tokens": self.output_tokens.to_string()},
        });
        if let Some(previous) = previous {
            body["previous_response_id"] = json!(previous);
        }
        let reply = self.http.post(&self.url).json(&body).send().await.map_err(|e| format!("request: {e}"))?;
        let status = reply.status();
        let response: Value = reply.json().await.map_err(|e| format!("body: {e}"))?;
        if !status.is_success() {
            return Err(format!("{status}: {}", response["error"]["code"]));
        }
        let id = response["id"].as_str().ok_or("no id")?.to_owned();
        let worker = response["x_tether"]["worker"].as_str().ok_or("no x_tether.worker")?;
        Ok((id, Arc::from(worker)))
    }

    /// Creates `count` sessions, `concurrency` at a time; the failures are returned apart.
    pub async fn create(&self, count: usize, concurrency: usize) -> (Vec<Session>, Vec<String>) {
        let done = Arc::new(AtomicUsize::new(0));
        let results = self.run(vec![None; count], concurrency, &done).await;
        let mut sessions = Vec::with_capacity(count);
        let mut failures = Vec::new();
        for result in results {
            match result {
                Ok((id, worker)) => {
                    let key = ResponseId::parse(&id).expect("the edge's ids parse").session_key().0;
                    sessions.push(Session { id, key, worker });
                }
                Err(error) => failures.push(error),
            }
        }
        (sessions, failures)
    }

    /// Continues each of `sessions[i]` for `i` in `which` once; `done` counts finished turns
    /// (a caller watching it can start a membership change mid-sweep). Updates the sessions
    /// that advanced and returns the failures.
    pub async fn sweep(
        &self,
        sessions: &mut [Session],
        which: &[usize],
        concurrency: usize,
        done: &AtomicUsize,
    ) -> Vec<String> {
        let previous: Vec<Option<String>> = which.iter().map(|&i| Some(sessions[i].id.clone())).collect();
        let results = self.run(previous, concurrency, done).await;
        let mut failures = Vec::new();
        for (&i, result) in which.iter().zip(results) {
            match result {
                Ok((id, worker)) => sessions[i] = Session { id, worker, key: sessions[i].key },
                Err(error) => failures.push(error),
            }
        }
        failures
    }

    /// One turn per entry (continuing it when `Some`), in order of the input.
    async fn run(&self, previous: Vec<Option<String>>, concurrency: usize, done: &AtomicUsize) -> Vec<TurnResult> {
        let turns = previous.into_iter().enumerate().map(|(at, previous)| async move {
            let result = self.turn(previous.as_deref()).await;
            done.fetch_add(1, Ordering::Relaxed);
            (at, result)
        });
        let mut results: Vec<(usize, TurnResult)> =
            futures_util::stream::iter(turns).buffer_unordered(concurrency.max(1)).collect().await;
        results.sort_by_key(|(at, _)| *at);
        results.into_iter().map(|(_, result)| result).collect()
    }
}
