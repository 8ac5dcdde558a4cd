//! The engine servers a shard fronts: one, or a small pool of replicas of one model. A session
//! goes to the same replica every turn (rendezvous hashing over the healthy ones), so the
//! replica's prefix cache holds its conversation. Each replica's `GET /v1/models` is probed on
//! an interval; the shard is ready while one answers.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tether_common::tokens::Fnv64;
use tokio_util::sync::CancellationToken;

use super::wire::ModelList;

/// One replica.
pub struct Upstream {
    pub base: String,
    healthy: AtomicBool,
}

impl Upstream {
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Records a probe's or a request's verdict; logs changes.
    pub fn set_healthy(&self, healthy: bool, detail: &str) {
        let was = self.healthy.swap(healthy, Ordering::Relaxed);
        match (was, healthy) {
            (false, true) => tracing::info!(upstream = %self.base, detail, "engine healthy"),
            (true, false) => tracing::warn!(upstream = %self.base, detail, "engine unhealthy"),
            _ => {}
        }
    }

    fn weight(&self, session: u64) -> u64 {
        let mut hash = Fnv64::new();
        hash.write(self.base.as_bytes());
        hash.write(&session.to_le_bytes());
        hash.finish()
    }
}

/// The replicas, in the order a session tries them.
pub struct Upstreams {
    replicas: Vec<Arc<Upstream>>,
}

impl Upstreams {
    pub fn new(bases: &[String]) -> Self {
        let replicas = bases
            .iter()
            .map(|base| Arc::new(Upstream { base: base.clone(), healthy: AtomicBool::new(false) }))
            .collect();
        Upstreams { replicas }
    }

    pub fn any_healthy(&self) -> bool {
        self.replicas.iter().any(|replica| replica.is_healthy())
    }

    /// The replicas to try for `session`: the healthy ones by rendezvous weight, then the rest
    /// (a probe may lag behind a replica that just came back).
    pub fn for_session(&self, session: u64) -> Vec<Arc<Upstream>> {
        let mut ranked: Vec<_> = self.replicas.clone();
        ranked.sort_by_key(|replica| (!replica.is_healthy(), std::cmp::Reverse(replica.weight(session))));
        ranked
    }

    /// Probes every replica now, then every `interval` until `stop`.
    pub fn spawn_probes(self: &Arc<Self>, http: reqwest::Client, interval: Duration, stop: CancellationToken) {
        for replica in &self.replicas {
            let (replica, http, stop) = (replica.clone(), http.clone(), stop.clone());
            tokio::spawn(async move {
                let mut ticks = tokio::time::interval(interval);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        _ = ticks.tick() => {}
                    }
                    match probe(&http, &replica.base, interval).await {
                        Ok(models) => replica.set_healthy(true, &models.join(",")),
                        Err(error) => replica.set_healthy(false, &error),
                    }
                }
            });
        }
    }

    /// Probes every replica once; returns the models each lists (for the startup log).
    pub async fn probe_all(
        &self,
        http: &reqwest::Client,
        timeout: Duration,
    ) -> Vec<(String, Result<Vec<String>, String>)> {
        let mut answers = Vec::new();
        for replica in &self.replicas {
            let answer = probe(http, &replica.base, timeout).await;
            replica.set_healthy(answer.is_ok(), answer.as_ref().map_or_else(|e| e.as_str(), |_| "probed"));
            answers.push((replica.base.clone(), answer));
        }
        answers
    }
}

/// `GET /v1/models`: the engine's health check (llama-cpp-python has no `/health`) and its
/// model listing.
pub async fn probe(http: &reqwest::Client, base: &str, timeout: Duration) -> Result<Vec<String>, String> {
    let response =
        http.get(format!("{base}/v1/models")).timeout(timeout).send().await.map_err(|error| error.to_string())?;
    if !response.status().is_success() {
        return Err(format!("GET /v1/models answered {}", response.status()));
    }
    let list: ModelList = response.json().await.map_err(|error| error.to_string())?;
    Ok(list.data.into_iter().map(|model| model.id).collect())
}

#[cfg(test)]
mod tests {
    use super::Upstreams;

    #[test]
    fn a_session_keeps_its_replica_and_moves_only_when_it_fails() {
        let upstreams = Upstreams::new(&["http://a".into(), "http://b".into(), "http://c".into()]);
        for replica in &upstreams.replicas {
            replica.set_healthy(true, "test");
        }
        let first: Vec<_> = (0..64u64).map(|s| upstreams.for_session(s)[0].base.clone()).collect();
        assert!(["http://a", "http://b", "http://c"].iter().all(|b| first.iter().any(|f| f == b)), "spread");
        let again: Vec<_> = (0..64u64).map(|s| upstreams.for_session(s)[0].base.clone()).collect();
        assert_eq!(first, again, "stable");
        upstreams.replicas[1].set_healthy(false, "test");
        for (session, before) in first.iter().enumerate() {
            let now = upstreams.for_session(session as u64);
            assert_eq!(now.last().unwrap().base, "http://b", "the unhealthy replica is tried last");
            if before != "http://b" {
                assert_eq!(&now[0].base, before, "sessions elsewhere stay put");
            }
        }
    }
}
