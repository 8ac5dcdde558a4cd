//! The openai engine: the shard as the sidecar of an OpenAI-compatible completion server
//! (vLLM, SGLang, llama.cpp's server, llama-cpp-python), or of a small pool of replicas of
//! one model.
//!
//! The engine server holds the real KV cache (its prefix cache); the shard's bookkeeping
//! still says which prefix each session has sent, so the workers' protocol is unchanged. Each
//! turn the whole prompt goes to `/v1/completions` with `stream: true` over a keep-alive
//! client: the session's held prefix (from the bookkeeping, [`Job::prefix`]) plus its new
//! tokens, as token ids where the engine takes them, else as text rendered with the model's
//! own vocabulary. The engine's text chunks come back as [`Piece`]s whose ids are that text in
//! the same vocabulary. The adapter keeps no per-session state: a session's replica follows
//! from its id ([`upstream::Upstreams::for_session`]).
//!
//! Failures are classified where they happen: unreachable → `Unavailable` (another shard may
//! serve the turn), 429 → `Overloaded`, 400/404/422 → `InvalidRequest`, a deadline →
//! `DeadlineExceeded`, a stream cut after it started → `Disconnected`. When the shard's
//! output channel closes (the client went away), the HTTP request is dropped, which closes
//! the connection and cancels the engine's work.

pub mod config;
mod sse;
pub mod upstream;
pub mod vocabulary;
mod wire;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Instant;

use futures_util::StreamExt;
use tether_common::discovery::BoxFuture;
use tether_proto::shard::v1::FinishReason;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use self::config::{OpenAiConfig, PromptMode};
use self::upstream::{Upstream, Upstreams};
use self::vocabulary::Vocabulary;
use self::wire::{CompletionChunk, CompletionRequest, Prompt, StreamOptions};
use super::{Engine, Job, Outcome, Piece};
use crate::error::ShardError;

pub struct OpenAiEngine {
    config: OpenAiConfig,
    models: Vec<String>,
    http: reqwest::Client,
    upstreams: Arc<Upstreams>,
    vocabulary: Arc<dyn Vocabulary>,
    /// Set once the engine refused a token-id prompt (`--openai-prompt auto`): text from then on.
    ids_refused: AtomicBool,
    busy: Arc<AtomicU32>,
    _probes: tokio_util::sync::DropGuard,
}

impl OpenAiEngine {
    /// Builds the engine with the model's vocabulary and starts probing the upstreams. Does
    /// not wait for them: the shard is ready once one answers.
    pub async fn start(config: OpenAiConfig, vocabulary: Arc<dyn Vocabulary>) -> Result<OpenAiEngine, ShardError> {
        if config.upstreams.is_empty() {
            return Err(ShardError::Engine("--engine openai needs --upstream".into()));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .pool_idle_timeout(std::time::Duration::from_secs(90))
            .tcp_nodelay(true)
            .build()
            .map_err(|error| ShardError::Engine(format!("http client: {error}")))?;
        let upstreams = Arc::new(Upstreams::new(&config.upstreams));
        for (base, answer) in upstreams.probe_all(&http, config.connect_timeout).await {
            match answer {
                Ok(models) => tracing::info!(upstream = %base, models = %models.join(","), "engine answers"),
                Err(error) => tracing::warn!(upstream = %base, %error, "engine not answering yet"),
            }
        }
        let stop = CancellationToken::new();
        upstreams.spawn_probes(http.clone(), config.health_interval, stop.clone());
        tracing::info!(
            model = %config.model_name,
            engine_model = %config.engine_model,
            upstreams = config.upstreams.len(),
            prompt = ?config.prompt,
            "openai engine ready"
        );
        Ok(OpenAiEngine {
            models: vec![config.model_name.clone()],
            config,
            http,
            upstreams,
            vocabulary,
            ids_refused: AtomicBool::new(false),
            busy: Arc::new(AtomicU32::new(0)),
            _probes: stop.drop_guard(),
        })
    }

    fn sends_text(&self) -> bool {
        match self.config.prompt {
            PromptMode::Text => true,
            PromptMode::Tokens => false,
            PromptMode::Auto => self.ids_refused.load(Ordering::Relaxed),
        }
    }

    /// Opens the completion stream for `prompt` on the session's replica (the next replica
    /// when one cannot be reached), falling back to a text prompt when the engine refuses
    /// token ids in `auto` mode.
    async fn open(&self, job: &Job, prompt: &[u32]) -> Result<reqwest::Response, ShardError> {
        let mut last = None;
        for replica in self.upstreams.for_session(job.session) {
            let text = self.sends_text();
            match self.post(&replica, job, prompt, text).await {
                // llama.cpp's servers take only string prompts; llama-cpp-python refuses ids
                // with a 500 (its validation errors are not 4xx), so any refusal counts.
                Err(refusal @ (ShardError::EngineRejected(_) | ShardError::Engine(_)))
                    if !text && self.config.prompt == PromptMode::Auto =>
                {
                    let response = self.post(&replica, job, prompt, true).await?;
                    tracing::info!(upstream = %replica.base, %refusal, "the engine refuses token-id prompts: sending text");
                    self.ids_refused.store(true, Ordering::Relaxed);
                    return Ok(response);
                }
                Err(ShardError::EngineUnavailable(message)) => {
                    replica.set_healthy(false, &message);
                    last = Some(ShardError::EngineUnavailable(message));
                }
                other => return other,
            }
        }
        Err(last.unwrap_or_else(|| ShardError::EngineUnavailable("no upstream".into())))
    }

    async fn post(
        &self,
        replica: &Upstream,
        job: &Job,
        prompt: &[u32],
        text: bool,
    ) -> Result<reqwest::Response, ShardError> {
        let rendered;
        let prompt = if text {
            rendered = self.vocabulary.decode(prompt);
            Prompt::Text(&rendered)
        } else {
            Prompt::Tokens(prompt)
        };
        let max_tokens = match (job.prefill_only, job.sampling.max_output_tokens) {
            (true, _) => 1,
            (false, 0) => self.config.max_output_tokens,
            (false, n) => n,
        };
        let body = CompletionRequest {
            model: &self.config.engine_model,
            prompt,
            stream: true,
            max_tokens,
            temperature: job.sampling.temperature,
            top_p: job.sampling.top_p,
            stream_options: StreamOptions { include_usage: true },
        };
        let request = self.http.post(format!("{}/v1/completions", replica.base)).json(&body).send();
        let response = tokio::time::timeout(self.config.first_token_timeout, request)
            .await
            .map_err(|_| ShardError::EngineTimeout("first-token"))?
            .map_err(|error| classify_transport(&error))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = response.bytes().await.unwrap_or_default();
        let message = format!("{status}: {}", wire::error_message(&body));
        Err(match status.as_u16() {
            400 | 404 | 413 | 422 => ShardError::EngineRejected(message),
            429 => ShardError::EngineOverloaded(message),
            502..=504 => ShardError::EngineUnavailable(message),
            _ => ShardError::Engine(message),
        })
    }

    /// Reads the stream to its end, sending pieces to `out`.
    async fn stream(&self, job: Job, out: mpsc::Sender<Piece>) -> Result<Outcome, ShardError> {
        let started = Instant::now();
        let mut prompt = job.prefix.clone();
        prompt.extend_from_slice(&job.new_tokens);
        debug_assert_eq!(prompt.len(), job.prompt_len as usize, "the prefix is the cached tokens");
        let response = tokio::select! {
            response = self.open(&job, &prompt) => response?,
            () = out.closed() => return Err(ShardError::NotServing),
        };
        let mut body = response.bytes_stream();
        let mut decoder = sse::SseDecoder::default();
        let mut completion = Vec::new();
        let mut reason = FinishReason::Stop;
        let mut engine_cached = None;
        let mut first: Option<Instant> = None;
        loop {
            let deadline = match first {
                None => started + self.config.first_token_timeout,
                Some(_) => Instant::now() + self.config.idle_timeout,
            };
            let bytes = tokio::select! {
                next = tokio::time::timeout_at(deadline.into(), body.next()) => match next {
                    Err(_) if first.is_none() => return Err(ShardError::EngineTimeout("first-token")),
                    Err(_) => return Err(ShardError::EngineTimeout("idle")),
                    Ok(None) => return Err(ShardError::EngineDisconnected("the stream ended without [DONE]".into())),
                    Ok(Some(Err(error))) => return Err(ShardError::EngineDisconnected(error.to_string())),
                    Ok(Some(Ok(bytes))) => bytes,
                },
                // The client went away: dropping the response closes the connection, which
                // cancels the engine's work.
                () = out.closed() => return Err(ShardError::NotServing),
            };
            let events = decoder
                .push(&bytes)
                .map_err(|_| ShardError::EngineDisconnected("an event exceeded the size bound".into()))?;
            for data in events {
                if data.trim() == "[DONE]" {
                    let now = Instant::now();
                    let first = first.unwrap_or(now);
                    return Ok(Outcome {
                        reason,
                        completion,
                        queue: std::time::Duration::ZERO,
                        prefill: first - started,
                        decode: now - first,
                        engine_cached,
                    });
                }
                let chunk: CompletionChunk = serde_json::from_str(&data)
                    .map_err(|error| ShardError::EngineDisconnected(format!("unreadable chunk: {error}")))?;
                if let Some(error) = &chunk.error {
                    return Err(ShardError::Engine(wire::summarize(error)));
                }
                if let Some(usage) = &chunk.usage {
                    engine_cached = usage.prompt_tokens_details.as_ref().and_then(|details| details.cached_tokens);
                }
                let Some(choice) = chunk.choices.into_iter().next() else { continue };
                first.get_or_insert_with(Instant::now);
                if choice.finish_reason.as_deref() == Some("length") {
                    reason = FinishReason::Length;
                }
                if job.prefill_only || choice.text.is_empty() {
                    continue;
                }
                let ids = self.vocabulary.encode(&choice.text);
                completion.extend_from_slice(&ids);
                if out.send(Piece { ids, text: choice.text }).await.is_err() {
                    return Err(ShardError::NotServing);
                }
            }
        }
    }
}

/// Classifies a failed request: no answer at all is `Unavailable` (the next replica or shard
/// may serve the turn).
fn classify_transport(error: &reqwest::Error) -> ShardError {
    if error.is_timeout() {
        ShardError::EngineTimeout("connect")
    } else {
        ShardError::EngineUnavailable(error.to_string())
    }
}

/// Counts a job as busy while it runs.
struct Busy(Arc<AtomicU32>);

impl Busy {
    fn new(counter: &Arc<AtomicU32>) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Busy(counter.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Engine for OpenAiEngine {
    fn name(&self) -> &'static str {
        "openai"
    }

    fn models(&self) -> &[String] {
        &self.models
    }

    fn context_window(&self) -> u32 {
        self.config.context_tokens
    }

    fn slots(&self) -> (u32, u32) {
        (self.config.slots, self.busy.load(Ordering::Relaxed))
    }

    fn wants_prefix(&self) -> bool {
        true
    }

    fn healthy(&self) -> bool {
        self.upstreams.any_healthy()
    }

    fn validate(&self, job: &Job) -> Result<(), ShardError> {
        if !self.models.contains(&job.model) {
            return Err(ShardError::UnknownModel(job.model.clone()));
        }
        if job.prompt_len > self.config.context_tokens {
            return Err(ShardError::ContextExceeded { needed: job.prompt_len, capacity: self.config.context_tokens });
        }
        if let Some(spec) = &job.tools {
            super::validate_tools(spec)?;
        }
        Ok(())
    }

    fn run(&self, job: Job, out: mpsc::Sender<Piece>) -> BoxFuture<'_, Result<Outcome, ShardError>> {
        Box::pin(async move {
            let _busy = Busy::new(&self.busy);
            self.stream(job, out).await
        })
    }
}

#[cfg(test)]
mod tests;
