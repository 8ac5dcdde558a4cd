//! The sim engine: a deterministic simulated model with a calibrated cost model.
//!
//! Output is derived from the prompt's hash, so the same prompt always yields the same
//! tokens. Time to first token is `ttft_base + prefill_per_token × uncached tokens`; tokens
//! then arrive at the decode rate. A bounded number of slots decode at once; the rest queue.
//! With tools it follows the policy in [`super::sim_tools`], writing the call in the chat
//! format's `<tool_call>` syntax, which the worker parses like a real model's output.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tether_common::discovery::BoxFuture;
use tether_common::tokenizer::CoreBPE;
use tether_common::tokenizer::{self, TOOL_CALL_CLOSE, TOOL_CALL_OPEN};
use tether_proto::shard::v1::FinishReason;
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;

use super::sim_tools::{self, HINT_OUTPUT_TOKENS, HINT_TOOL_CALLS};
use super::{Engine, Job, Outcome, Piece};
use crate::error::ShardError;

#[derive(Clone, Debug)]
pub struct SimConfig {
    pub models: Vec<String>,
    pub ttft_base: Duration,
    pub prefill_per_token: Duration,
    pub decode_interval: Duration,
    pub slots: u32,
    pub output_tokens: u32,
}

/// Words that are one o200k token each with a leading space: the sim model's vocabulary.
const WORDS: &[&str] = &[
    "the", "model", "router", "session", "token", "cache", "worker", "shard", "agent", "tool", "call", "result",
    "test", "output", "input", "state", "turn", "time", "fast", "small", "large", "first", "next", "last", "new",
    "old", "data", "file", "code", "build", "run", "check", "pass", "fail", "error", "value", "list", "map", "key",
    "node", "edge", "ring", "hash", "load", "work", "plan", "step", "done", "good", "clear", "simple", "ready", "open",
    "close", "read", "write", "send", "keep", "move", "hold", "start", "stop", "and", "with",
];

/// Words that open an answer: one token each without a leading space.
const START_WORDS: &[&str] = &["The", "This", "Here", "Done", "Sure", "Yes", "All", "Next"];

pub struct SimEngine {
    config: SimConfig,
    slots: Arc<Semaphore>,
    busy: AtomicU32,
    bpe: Arc<CoreBPE>,
    vocabulary: Vec<(u32, String)>,
    openers: Vec<(u32, String)>,
    period: u32,
}

impl SimEngine {
    pub fn new(config: SimConfig) -> Self {
        let bpe = tokenizer::o200k();
        let single = |text: String| {
            let ids = bpe.encode_ordinary(&text);
            (ids.len() == 1).then(|| (ids[0], text))
        };
        let vocabulary: Vec<(u32, String)> = WORDS.iter().filter_map(|word| single(format!(" {word}"))).collect();
        let openers: Vec<(u32, String)> = START_WORDS.iter().filter_map(|word| single((*word).to_owned())).collect();
        assert!(!openers.is_empty(), "the sim needs an opening word");
        assert!(vocabulary.len() >= 32, "the sim vocabulary needs single-token words");
        let period = bpe.encode_ordinary(".")[0];
        SimEngine {
            slots: Arc::new(Semaphore::new(config.slots as usize)),
            busy: AtomicU32::new(0),
            config,
            bpe,
            vocabulary,
            openers,
            period,
        }
    }

    fn hint(job: &Job, key: &str) -> Option<u32> {
        job.hints.get(key).and_then(|v| v.trim().parse().ok())
    }

    /// Returns the whole output of `job` as pieces (one per token) and whether it was cut
    /// by `max_output_tokens`.
    fn plan_output(&self, job: &Job) -> Result<(Vec<Piece>, FinishReason), ShardError> {
        let call = match &job.tools {
            Some(spec) => {
                let calls_before_answer = Self::hint(job, HINT_TOOL_CALLS).unwrap_or(1);
                sim_tools::plan(spec, calls_before_answer, job.prompt_hash)?
            }
            None => None,
        };
        let mut pieces = match call {
            Some(call) => {
                let body = serde_json::json!({"name": call.name, "arguments": call.arguments});
                let text = format!("{TOOL_CALL_OPEN}{body}{TOOL_CALL_CLOSE}");
                self.bpe
                    .encode_ordinary(&text)
                    .into_iter()
                    .map(|id| Piece { text: self.bpe.decode(&[id]).unwrap_or_default(), ids: vec![id] })
                    .collect()
            }
            None => {
                let length = Self::hint(job, HINT_OUTPUT_TOKENS).unwrap_or(self.config.output_tokens).max(1);
                let mut state = job.prompt_hash;
                let (opener_id, opener) = &self.openers[(next(&mut state) % self.openers.len() as u64) as usize];
                let mut pieces = vec![Piece { ids: vec![*opener_id], text: opener.clone() }];
                pieces.extend((1..length.saturating_sub(1)).map(|_| {
                    let (id, text) = &self.vocabulary[(next(&mut state) % self.vocabulary.len() as u64) as usize];
                    Piece { ids: vec![*id], text: text.clone() }
                }));
                pieces.truncate((length - 1) as usize);
                pieces.push(Piece { ids: vec![self.period], text: ".".into() });
                pieces
            }
        };
        let max = job.sampling.max_output_tokens;
        if max > 0 && pieces.len() > max as usize {
            pieces.truncate(max as usize);
            return Ok((pieces, FinishReason::Length));
        }
        Ok((pieces, FinishReason::Stop))
    }
}

/// splitmix64.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Engine for SimEngine {
    fn name(&self) -> &'static str {
        "sim"
    }

    fn models(&self) -> &[String] {
        &self.config.models
    }

    fn slots(&self) -> (u32, u32) {
        (self.config.slots, self.busy.load(Ordering::Relaxed))
    }

    fn validate(&self, job: &Job) -> Result<(), ShardError> {
        if !self.config.models.contains(&job.model) {
            return Err(ShardError::UnknownModel(job.model.clone()));
        }
        self.plan_output(job).map(|_| ())
    }

    fn run(&self, job: Job, out: mpsc::Sender<Piece>) -> BoxFuture<'_, Result<Outcome, ShardError>> {
        Box::pin(async move {
            let queued = Instant::now();
            let _permit = self.slots.clone().acquire_owned().await.map_err(|_| ShardError::NotServing)?;
            self.busy.fetch_add(1, Ordering::Relaxed);
            let _busy = BusyGuard(&self.busy);
            let queue = queued.elapsed();

            let uncached = job.prompt_len.saturating_sub(job.cached);
            let prefill = self.config.ttft_base + self.config.prefill_per_token * uncached;
            let started = Instant::now();
            tokio::time::sleep(prefill).await;
            if job.prefill_only {
                return Ok(Outcome {
                    reason: FinishReason::Stop,
                    completion: Vec::new(),
                    queue,
                    prefill,
                    decode: Duration::ZERO,
                });
            }

            let (pieces, reason) = self.plan_output(&job)?;
            let first = started + prefill;
            let mut completion = Vec::with_capacity(pieces.len());
            let mut pending = Piece { ids: Vec::new(), text: String::new() };
            for (index, piece) in pieces.into_iter().enumerate() {
                let due = first + self.config.decode_interval * index as u32;
                if due > Instant::now() && !pending.ids.is_empty() {
                    // Flush what is due before waiting for the next token.
                    if out
                        .send(std::mem::replace(&mut pending, Piece { ids: Vec::new(), text: String::new() }))
                        .await
                        .is_err()
                    {
                        return Err(ShardError::NotServing);
                    }
                }
                tokio::time::sleep_until(due).await;
                completion.extend_from_slice(&piece.ids);
                pending.ids.extend(piece.ids);
                pending.text.push_str(&piece.text);
            }
            if !pending.ids.is_empty() && out.send(pending).await.is_err() {
                return Err(ShardError::NotServing);
            }
            let decode = first.elapsed();
            Ok(Outcome { reason, completion, queue, prefill, decode })
        })
    }
}

struct BusyGuard<'a>(&'a AtomicU32);

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
