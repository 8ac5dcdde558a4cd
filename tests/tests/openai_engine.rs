//! The openai engine in front of a real engine server (issue 13): llama-cpp-python serving
//! SmolLM2-135M-Instruct (`scripts/llama-cpp-server.py`), behind an in-process cluster's
//! shard. A turn streams from it; once the engine process is SIGKILLed, the next turn ends in a
//! classified error (HTTP 503, an OpenAI error object) within a bound, never a hang, and the
//! shard reports not ready. (Each engine failure's exact class is pinned by the shard's
//! scripted-server tests, `engine/openai/tests.rs`; the SDK suite is
//! `tests/python/test_openai_engine.py`.)
//!
//! Needs the `llama` feature (the shard's GGUF vocabulary loader), the model file
//! (`scripts/fetch-model.sh`; `TETHER_LLAMA_MODEL` overrides the path) and a Python with
//! `tests/python/engine-requirements.txt` (`TETHER_PYTHON`, else `.venv/bin/python`). Missing
//! ones fail the test: a build with the feature is a request to run it.
//!
//!   cargo test -p tether-tests --features llama --test openai_engine
#![cfg(feature = "llama")]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use tether_shard::config::OpenAiConfig;
use tether_tests::Cluster;
use tether_tests::client::output_text;
use tether_tests::wait::{until, within};
use tracing::info;

const MODEL: &str = "smollm2-135m-instruct";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn model_path() -> PathBuf {
    let path = std::env::var_os("TETHER_LLAMA_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    assert!(path.is_file(), "model file {} is missing: run scripts/fetch-model.sh", path.display());
    path
}

fn python() -> PathBuf {
    std::env::var_os("TETHER_PYTHON").map(PathBuf::from).unwrap_or_else(|| repo().join(".venv/bin/python"))
}

/// A llama-cpp-python server process, killed on drop.
struct EngineServer {
    child: Child,
    url: String,
    _logs: tempfile::TempDir,
}

impl EngineServer {
    fn start() -> EngineServer {
        let logs = tempfile::tempdir().expect("temp dir");
        let stderr = std::fs::File::create(logs.path().join("engine.log")).expect("log file");
        let mut child = Command::new(python())
            .arg(repo().join("scripts/llama-cpp-server.py"))
            .args(["--model".as_ref(), model_path().as_os_str()])
            .args(["--alias", MODEL, "--n-ctx", "2048", "--threads", "1", "--quiet"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e} (set TETHER_PYTHON)", python().display()));
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("llama-cpp-server listening on ") {
                    let _ = tx.send(url.trim().to_owned());
                }
            }
        });
        let url = rx.recv_timeout(Duration::from_secs(120)).unwrap_or_else(|_| {
            let _ = child.kill();
            let log = std::fs::read_to_string(logs.path().join("engine.log")).unwrap_or_default();
            panic!("llama-cpp-server did not start (pip install -r tests/python/engine-requirements.txt):\n{log}")
        });
        EngineServer { child, url, _logs: logs }
    }

    /// SIGKILL: the engine process crashes.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for EngineServer {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn post(http: &reqwest::Client, cluster: &Cluster, body: Value) -> (u16, Value) {
    within(Duration::from_secs(60), "an answer (not a hang)", async {
        let reply = http.post(format!("{}/v1/responses", cluster.url())).json(&body).send().await.expect("post");
        (reply.status().as_u16(), reply.json::<Value>().await.expect("json"))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_engine_server_is_a_classified_error_not_a_hang() {
    let mut engine = EngineServer::start();
    let vocabulary = model_path();
    let mut config = OpenAiConfig::new(engine.url.clone(), MODEL);
    config.vocabulary = Some(vocabulary.clone());
    config.context_tokens = 2048;
    config.health_interval = Duration::from_millis(200);
    let mut cluster = Cluster::builder()
        .shards(1)
        .workers(1)
        .shard_config(|c| c.openai = Some(config))
        .worker_config(|c| {
            c.default_model = MODEL.into();
            c.llama_models = vec![(MODEL.into(), vocabulary)];
        })
        .start()
        .await;
    let http = reqwest::Client::new();
    let shard_ready = format!("{}/readyz", cluster.shard("shard-0").url());
    let ready = |http: reqwest::Client, url: String| async move {
        http.get(url).send().await.map(|reply| reply.status().as_u16()).unwrap_or(0)
    };
    assert_eq!(ready(http.clone(), shard_ready.clone()).await, 200, "the engine answers its probe");

    info!("--- a turn through the engine server");
    let body = json!({"model": MODEL, "input": "Name a color.", "temperature": 0, "max_output_tokens": 8});
    let (status, first) = post(&http, &cluster, body).await;
    assert_eq!(status, 200, "{first}");
    assert!(output_text(&first).chars().any(char::is_alphabetic), "real text: {first}");

    info!("--- SIGKILL the engine server");
    engine.kill();
    let body =
        json!({"model": MODEL, "previous_response_id": first["id"], "input": "Another one.", "max_output_tokens": 8});
    let (status, failed) = post(&http, &cluster, body).await;
    assert_eq!(status, 503, "an unreachable engine is unavailable: {failed}");
    let error = &failed["error"];
    assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()), "an OpenAI error object: {failed}");
    info!(%failed, "classified");
    until(Duration::from_secs(10), "the shard reports not ready", || {
        let (http, url) = (http.clone(), shard_ready.clone());
        async move { (ready(http, url).await == 503).then_some(()) }
    })
    .await;
}
