//! The openai engine against scripted engine servers, one exact failure each: an engine that
//! is gone, one that dies mid-stream, one that never answers, one that is full, one that
//! refuses token-id prompts, and a client that goes away. Each must end in its error class
//! promptly, never a hang. (The real server, llama-cpp-python, is in tests/python and
//! tests/tests/openai_engine.rs.)

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tether_common::ErrorClass;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use super::OpenAiEngine;
use super::config::{OpenAiConfig, PromptMode};
use super::vocabulary::Vocabulary;
use crate::engine::{Engine, Job, Outcome, Piece};
use crate::error::ShardError;

/// One token per byte: enough to check ids and text travel together.
struct Bytewise;

impl Vocabulary for Bytewise {
    fn encode(&self, text: &str) -> Vec<u32> {
        text.bytes().map(u32::from).collect()
    }

    fn decode(&self, ids: &[u32]) -> String {
        String::from_utf8_lossy(&ids.iter().map(|&id| id as u8).collect::<Vec<_>>()).into_owned()
    }
}

/// What the scripted server does with a completion request.
#[derive(Clone, Copy)]
enum Script {
    /// Streams "Hi" and " there", a usage chunk with 3 cached tokens, then `[DONE]`.
    Answer,
    /// Refuses token-id prompts with a 500 (as llama-cpp-python does), answers text prompts.
    TextOnly,
    /// Streams one chunk, then breaks the connection when the test says so.
    DieMidStream,
    /// 429: the engine's queue is full.
    Full,
    /// Streams one chunk, then nothing (until the client goes away).
    Stall,
}

struct Server {
    script: Script,
    bodies: mpsc::UnboundedSender<Value>,
    /// Told when a stalled stream's connection is gone (the client cancelled).
    dropped: mpsc::UnboundedSender<()>,
    /// Kills a `DieMidStream` stream.
    die: Arc<tokio::sync::Notify>,
}

fn chunk(text: &str, finish: Option<&str>) -> Bytes {
    let chunk = json!({"choices": [{"index": 0, "text": text, "finish_reason": finish}]});
    // sse-starlette's line endings, as llama-cpp-python sends them
    Bytes::from(format!("data: {chunk}\r\n\r\n"))
}

async fn completions(State(server): State<Arc<Server>>, body: axum::Json<Value>) -> Response {
    let prompt_is_text = body["prompt"].is_string();
    let _ = server.bodies.send(body.0);
    let sse = |parts: Vec<Result<Bytes, std::io::Error>>| {
        Response::builder()
            .header("content-type", "text/event-stream")
            .body(Body::from_stream(tokio_stream::iter(parts)))
            .expect("response")
    };
    match server.script {
        Script::TextOnly if !prompt_is_text => {
            // llama-cpp-python's answer: a 500 whose message holds pydantic's errors
            let message = "1 validation errors:\n  {'type': 'string_type', 'loc': ('body', 'prompt', 'str'), 'msg': 'Input should be a valid string', 'input': [1, 2]}";
            (StatusCode::INTERNAL_SERVER_ERROR, axum::Json(json!({"error": {"message": message}}))).into_response()
        }
        Script::Answer | Script::TextOnly => {
            let usage = json!({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 3}}});
            sse(vec![
                Ok(chunk("Hi", None)),
                Ok(chunk(" there", Some("length"))),
                Ok(Bytes::from(format!("data: {usage}\n\n"))),
                Ok(Bytes::from("data: [DONE]\r\n\r\n")),
            ])
        }
        Script::DieMidStream => {
            use futures_util::StreamExt;
            let first = tokio_stream::once(Ok::<_, std::io::Error>(chunk("Hi", None)));
            let die = server.die.clone();
            let killed = futures_util::stream::once(async move {
                die.notified().await;
                Err(std::io::Error::other("engine killed"))
            });
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(Body::from_stream(first.chain(killed)))
                .expect("response")
        }
        Script::Full => {
            (StatusCode::TOO_MANY_REQUESTS, axum::Json(json!({"error": {"message": "queue full"}}))).into_response()
        }
        Script::Stall => {
            struct Notify(mpsc::UnboundedSender<()>);
            impl Drop for Notify {
                fn drop(&mut self) {
                    let _ = self.0.send(());
                }
            }
            let notify = Notify(server.dropped.clone());
            let first = tokio_stream::once(Ok::<_, std::io::Error>(chunk("Hi", None)));
            let stall = futures_util::stream::unfold(notify, |notify| async move {
                std::future::pending::<()>().await;
                Some((Ok(Bytes::new()), notify))
            });
            use futures_util::StreamExt;
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(Body::from_stream(first.chain(stall)))
                .expect("response")
        }
    }
}

struct Scripted {
    url: String,
    die: Arc<tokio::sync::Notify>,
    bodies: mpsc::UnboundedReceiver<Value>,
    dropped: mpsc::UnboundedReceiver<()>,
}

async fn scripted(script: Script) -> Scripted {
    let (bodies_tx, bodies) = mpsc::unbounded_channel();
    let (dropped_tx, dropped) = mpsc::unbounded_channel();
    let die = Arc::new(tokio::sync::Notify::new());
    let state = Arc::new(Server { script, bodies: bodies_tx, dropped: dropped_tx, die: die.clone() });
    let app = Router::new()
        .route("/v1/models", get(|| async { axum::Json(json!({"object": "list", "data": [{"id": "m"}]})) }))
        .route("/v1/completions", post(completions))
        .with_state(state);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    Scripted { url, die, bodies, dropped }
}

fn config(url: &str) -> OpenAiConfig {
    let mut config = OpenAiConfig::new(url, "m");
    config.first_token_timeout = Duration::from_millis(800);
    config.idle_timeout = Duration::from_millis(800);
    config.connect_timeout = Duration::from_millis(800);
    config
}

async fn engine(config: OpenAiConfig) -> OpenAiEngine {
    OpenAiEngine::start(config, Arc::new(Bytewise)).await.expect("engine")
}

fn job() -> Job {
    Job {
        session: 7,
        model: "m".into(),
        prompt_len: 5,
        cached: 3,
        new_tokens: b"lo".iter().map(|&b| u32::from(b)).collect(),
        prefix: b"hel".iter().map(|&b| u32::from(b)).collect(),
        prompt_hash: 0,
        resumed: 0,
        sampling: Default::default(),
        tools: None,
        hints: Default::default(),
        prefill_only: false,
        output_format: None,
    }
}

/// Runs `job` to its end (bounded), collecting the pieces.
async fn run(engine: &OpenAiEngine, job: Job) -> (Vec<Piece>, Result<Outcome, ShardError>) {
    let (tx, mut rx) = mpsc::channel(16);
    let collect = tokio::spawn(async move {
        let mut pieces = Vec::new();
        while let Some(piece) = rx.recv().await {
            pieces.push(piece);
        }
        pieces
    });
    let result = tokio::time::timeout(Duration::from_secs(10), engine.run(job, tx)).await.expect("the job ends");
    (collect.await.expect("collector"), result)
}

#[tokio::test]
async fn streams_pieces_with_ids_usage_and_the_whole_prompt() {
    let mut server = scripted(Script::Answer).await;
    let engine = engine(config(&server.url)).await;
    assert!(engine.healthy(), "the first probe ran at start");
    let (pieces, result) = run(&engine, job()).await;
    let outcome = result.expect("completed");
    assert_eq!(pieces.iter().map(|p| p.text.as_str()).collect::<String>(), "Hi there");
    assert_eq!(pieces[0].ids, vec![u32::from(b'H'), u32::from(b'i')]);
    assert_eq!(outcome.completion, Bytewise.encode("Hi there"));
    assert_eq!(outcome.reason, tether_proto::shard::v1::FinishReason::Length);
    assert_eq!(outcome.engine_cached, Some(3), "the engine's own cached count");
    let body = server.bodies.recv().await.expect("a request");
    assert_eq!(body["prompt"], json!(Bytewise.encode("hello")), "prefix + new tokens, as ids");
    assert_eq!(body["stream"], json!(true));
    assert_eq!(body["model"], json!("m"));
}

#[tokio::test]
async fn a_refused_token_prompt_falls_back_to_text_for_good() {
    let mut server = scripted(Script::TextOnly).await;
    let engine = engine(config(&server.url)).await;
    let (pieces, result) = run(&engine, job()).await;
    result.expect("completed as text");
    assert_eq!(pieces.len(), 2);
    assert!(server.bodies.recv().await.expect("first")["prompt"].is_array());
    assert_eq!(server.bodies.recv().await.expect("retry")["prompt"], json!("hello"));
    let (_, result) = run(&engine, job()).await;
    result.expect("completed");
    assert_eq!(server.bodies.recv().await.expect("next turn")["prompt"], json!("hello"), "text from then on");

    let mut tokens_only = config(&server.url);
    tokens_only.prompt = PromptMode::Tokens;
    let engine = self::engine(tokens_only).await;
    let (_, result) = run(&engine, job()).await;
    let error = result.expect_err("refused");
    assert_eq!(error.class(), ErrorClass::Internal, "{error}");
    assert!(!error.to_string().contains("[1, 2]"), "the engine's echo of the prompt is not kept: {error}");
}

#[tokio::test]
async fn an_engine_that_is_gone_is_unavailable_not_a_hang() {
    // A port that takes connections and closes them at once: the engine process is gone.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            drop(socket);
        }
    });
    let engine = engine(config(&url)).await;
    assert!(!engine.healthy(), "its probe failed: the shard is not ready");
    let (pieces, result) = run(&engine, job()).await;
    assert!(pieces.is_empty());
    let error = result.expect_err("no engine");
    assert_eq!(error.class(), ErrorClass::Unavailable, "{error}");
}

#[tokio::test]
async fn an_engine_killed_mid_stream_is_a_disconnect_after_its_tokens() {
    let server = scripted(Script::DieMidStream).await;
    let engine = engine(config(&server.url)).await;
    let (tx, mut rx) = mpsc::channel(16);
    let job = tokio::spawn(async move { engine.run(job(), tx).await.map(|_| ()) });
    let first = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("a piece").expect("open");
    assert_eq!(first.text, "Hi", "what streamed before the break is delivered");
    kill_stream(&server);
    let result = tokio::time::timeout(Duration::from_secs(10), job).await.expect("the job ends").expect("joined");
    let error = result.expect_err("broken stream");
    assert_eq!(error.class(), ErrorClass::Disconnected, "{error}");
}

/// Kills the scripted engine's stream (the process died mid-answer).
fn kill_stream(server: &Scripted) {
    server.die.notify_one();
}

#[tokio::test]
async fn a_full_engine_is_overloaded() {
    let server = scripted(Script::Full).await;
    let engine = engine(config(&server.url)).await;
    let (_, result) = run(&engine, job()).await;
    let error = result.expect_err("full");
    assert_eq!(error.class(), ErrorClass::Overloaded, "{error}");
}

#[tokio::test]
async fn silence_hits_a_deadline() {
    // An engine that accepts and never answers (hung): the first-token deadline.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let engine = engine(config(&url)).await;
    let (_, result) = run(&engine, job()).await;
    assert_eq!(result.expect_err("hung").class(), ErrorClass::DeadlineExceeded);

    // One that stops mid-stream: the idle deadline.
    let server = scripted(Script::Stall).await;
    let engine = self::engine(config(&server.url)).await;
    let (pieces, result) = run(&engine, job()).await;
    assert_eq!(pieces.len(), 1);
    assert_eq!(result.expect_err("stalled").class(), ErrorClass::DeadlineExceeded);
}

#[tokio::test]
async fn a_client_that_goes_away_cancels_the_engine_request() {
    let mut server = scripted(Script::Stall).await;
    let mut config = config(&server.url);
    config.idle_timeout = Duration::from_secs(60); // only the cancellation can end it in time
    let engine = engine(config).await;
    let (tx, mut rx) = mpsc::channel(16);
    let job = tokio::spawn(async move { engine.run(job(), tx).await.map(|_| ()) });
    let first = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("a piece").expect("open");
    assert_eq!(first.text, "Hi");
    drop(rx); // the gRPC stream went away
    let result = tokio::time::timeout(Duration::from_secs(10), job).await.expect("the job ends").expect("joined");
    assert!(matches!(result, Err(ShardError::NotServing)), "{result:?}");
    tokio::time::timeout(Duration::from_secs(10), server.dropped.recv())
        .await
        .expect("the engine saw its request cancelled");
}
