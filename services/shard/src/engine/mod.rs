//! The engine interface every shard engine implements, and the shared job types.
//!
//! The shard's gRPC layer owns the KV-cache bookkeeping and the wire; an engine turns a job
//! (prompt length, cached length, new tokens, sampling, tools) into a stream of token pieces.

#[cfg(feature = "llama")]
pub mod llama;
pub mod openai;
pub mod schema;
pub mod sim;
pub mod sim_tools;
#[cfg(any(feature = "llama", test))]
pub mod state_format;

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;
use tether_common::discovery::BoxFuture;
use tether_proto::shard::v1::{FinishReason, OutputFormat, Sampling, ToolChoice, ToolSpec};
use tokio::sync::mpsc;

use crate::error::ShardError;

/// One turn for an engine.
#[derive(Debug, Clone)]
pub struct Job {
    /// The session whose KV cache the job extends (an engine that keeps per-session state,
    /// like the llama engine's sequences, keys it by this).
    pub session: u64,
    pub model: String,
    /// Tokens in the whole prompt.
    pub prompt_len: u32,
    /// Leading prompt tokens already in the KV cache.
    pub cached: u32,
    /// The prompt tokens after the cached prefix.
    pub new_tokens: Vec<u32>,
    /// The cached prefix itself (`cached` tokens), for an engine that sends the whole prompt
    /// every turn ([`Engine::wants_prefix`]); empty for the others.
    pub prefix: Vec<u32>,
    /// Hash of the prompt without its resumed output (see [`Job::resumed`]): the
    /// deterministic seed of the sim engine and of sampling.
    pub prompt_hash: u64,
    /// The last `resumed` prompt tokens are this response's own output so far (its worker went
    /// away mid-response): the engine continues the same generation after them, and
    /// `sampling.max_output_tokens` counts only the rest.
    pub resumed: u32,
    pub sampling: Sampling,
    pub tools: Option<ToolSpec>,
    pub hints: HashMap<String, String>,
    pub prefill_only: bool,
    /// The shape of a text answer (`text.format`); `None` is plain text.
    pub output_format: Option<OutputFormat>,
}

/// Generated tokens and their text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub ids: Vec<u32>,
    pub text: String,
}

/// How a job ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub reason: FinishReason,
    pub completion: Vec<u32>,
    pub queue: Duration,
    pub prefill: Duration,
    pub decode: Duration,
    /// Prompt tokens the engine itself reports as cached, when it reports them (an
    /// OpenAI-compatible server's `prompt_tokens_details.cached_tokens`); the shard's
    /// bookkeeping says how many it sent as cached otherwise.
    pub engine_cached: Option<u32>,
}

pub trait Engine: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    fn models(&self) -> &[String];
    /// Tokens one session can hold, prompt plus output: the model's context window.
    fn context_window(&self) -> u32;
    /// Total and busy decode slots.
    fn slots(&self) -> (u32, u32);
    /// Whether the engine can constrain a text answer to JSON (a schema or any object); the
    /// shard refuses JSON output formats for an engine that cannot.
    fn structured_outputs(&self) -> bool {
        false
    }
    /// Whether jobs must carry their cached prefix ([`Job::prefix`]): an engine that holds no
    /// KV cache of its own keyed by session sends the whole prompt each turn.
    fn wants_prefix(&self) -> bool {
        false
    }
    /// Whether the engine can take work now (the shard's readiness follows it).
    fn healthy(&self) -> bool {
        true
    }
    /// Rejects a job the engine cannot run, before any token is streamed.
    fn validate(&self, job: &Job) -> Result<(), ShardError>;
    /// Runs `job`, sending pieces as they are decoded. Stops early when `out` closes.
    fn run(&self, job: Job, out: mpsc::Sender<Piece>) -> BoxFuture<'_, Result<Outcome, ShardError>>;
    /// Frees whatever the engine holds for `session` (the KV cache bookkeeping dropped it).
    fn drop_session(&self, _session: u64) {}
    /// Returns the engine's state for `session`'s cached tokens, to import on another shard;
    /// `None` when the engine holds nothing for it (or cannot export it now, mid-turn). The
    /// default suits an engine without per-session state (the sim): an empty state.
    fn export_session(&self, _session: u64) -> BoxFuture<'_, Result<Option<Vec<u8>>, ShardError>> {
        Box::pin(async { Ok(Some(Vec::new())) })
    }
    /// Loads `state` exported by an engine of the same kind and model, so `session` holds
    /// `tokens`. The default suits an engine without per-session state: nothing to load.
    fn import_session(
        &self,
        _session: u64,
        _tokens: Vec<u32>,
        state: Vec<u8>,
    ) -> BoxFuture<'_, Result<(), ShardError>> {
        Box::pin(async move {
            if state.is_empty() {
                Ok(())
            } else {
                Err(ShardError::IncompatibleState(format!(
                    "{} engine keeps no session state; got {} bytes",
                    self.name(),
                    state.len()
                )))
            }
        })
    }
}

/// Checks the tool definitions the prompt carries, for an engine that sees them only in its
/// prompt (the worker renders them): `tool_choice` cannot force such a model, and a call it
/// does not write is never made up, but a forced function must be among the tools.
pub fn validate_tools(spec: &ToolSpec) -> Result<(), ShardError> {
    if spec.tools_json.trim().is_empty() {
        return Ok(());
    }
    let tools: Vec<Value> =
        serde_json::from_str(&spec.tools_json).map_err(|e| ShardError::InvalidTools(e.to_string()))?;
    if ToolChoice::try_from(spec.choice) == Ok(ToolChoice::Function)
        && !tools.iter().any(|tool| tool.get("name").and_then(Value::as_str) == Some(spec.function.as_str()))
    {
        return Err(ShardError::UnknownFunction(spec.function.clone()));
    }
    Ok(())
}
