//! The sim engine: a deterministic simulated model with a calibrated cost model.
//!
//! Output is derived from the prompt's hash, so the same prompt always yields the same
//! tokens. Time to first token is `ttft_base + prefill_per_token × uncached tokens`; tokens
//! then arrive at the decode rate. A bounded number of slots decode at once; the rest queue.
//! With tools it follows the policy in [`super::sim_tools`], writing the call in the chat
//! format's `<tool_call>` syntax, which the worker parses like a real model's output. With a
//! JSON output format (`text.format`) its text answer is JSON that validates against the
//! format's schema (see [`super::schema`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tether_common::discovery::BoxFuture;
use tether_common::limits;
use tether_common::tokenizer::CoreBPE;
use tether_common::tokenizer::{self, TOOL_CALL_CLOSE, TOOL_CALL_OPEN};
use tether_proto::shard::v1::{FinishReason, OutputFormat, OutputFormatKind};
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;

use super::schema::Contract;
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
    /// Tokens a session may hold: prompt plus output (a real small model's window).
    pub context_window: u32,
    /// Whether JSON output formats are honoured (always, from the command line; tests turn
    /// it off to stand in for an engine that cannot constrain its output, like llama's).
    pub structured_outputs: bool,
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

    fn hint(job: &Job, key: &str, cap: u32) -> Option<u32> {
        // The worker refuses hints past the cap; clamp here too, so no client number sizes
        // the output even when a caller skipped that check.
        job.hints.get(key).and_then(|v| v.trim().parse::<u64>().ok()).map(|n| n.min(u64::from(cap)) as u32)
    }

    /// Returns the generator of `job`'s output: nothing is produced before it is sent, and it
    /// stops at `max_output_tokens`, at the room left in the context window and at the server
    /// cap, whatever the hints ask for.
    fn plan_output(&self, job: &Job) -> Result<Generator, ShardError> {
        let call = match &job.tools {
            Some(spec) => {
                let calls_before_answer = Self::hint(job, HINT_TOOL_CALLS, limits::SIM_TOOL_CALLS).unwrap_or(1);
                sim_tools::plan(spec, calls_before_answer, job.prompt_hash)?
            }
            None => None,
        };
        let format = job.output_format.as_ref().map_or(OutputFormatKind::Text, OutputFormat::kind);
        let (source, natural) = match (call, format) {
            (Some(call), _) => {
                // A call's size is bounded by its tool's schema, which the worker caps.
                let body = serde_json::json!({"name": call.name, "arguments": call.arguments});
                self.pieces(&format!("{TOOL_CALL_OPEN}{body}{TOOL_CALL_CLOSE}"))
            }
            (None, OutputFormatKind::Text) => {
                let length = Self::hint(job, HINT_OUTPUT_TOKENS, limits::SIM_OUTPUT_TOKENS)
                    .unwrap_or(self.config.output_tokens)
                    .clamp(1, limits::SIM_OUTPUT_TOKENS);
                (Source::Text { length, index: 0, state: job.prompt_hash }, length)
            }
            (None, kind) => {
                // Like a call, the answer's size is bounded by the schema the worker capped.
                let format = job.output_format.as_ref().expect("a JSON kind comes from a format");
                self.pieces(&self.structured_answer(kind, format, job.prompt_hash)?)
            }
        };
        // A resumed job plans the whole output of the original request and skips what was
        // already produced (see `run`): its budget and room count that part too.
        let requested = match job.sampling.max_output_tokens {
            0 => u32::MAX,
            max => max.saturating_add(job.resumed),
        };
        let room = self.config.context_window.saturating_sub(job.prompt_len - job.resumed);
        let budget = requested.min(room);
        let (limit, reason) =
            if natural > budget { (budget, FinishReason::Length) } else { (natural, FinishReason::Stop) };
        Ok(Generator { source, limit, emitted: 0, reason })
    }

    /// Returns the next piece of `generator`, or `None` when the output is complete.
    fn next_piece(&self, generator: &mut Generator) -> Option<Piece> {
        if generator.emitted >= generator.limit {
            return None;
        }
        let piece = match &mut generator.source {
            Source::Pieces(pieces) => {
                let piece = pieces.peek()?;
                if generator.emitted + piece.ids.len() as u32 > generator.limit {
                    return None;
                }
                pieces.next()?
            }
            Source::Text { length, index, state } => {
                let (id, text) = if *index + 1 >= *length {
                    (self.period, ".".to_owned())
                } else if *index == 0 {
                    let (id, text) = &self.openers[(next(state) % self.openers.len() as u64) as usize];
                    (*id, text.clone())
                } else {
                    let (id, text) = &self.vocabulary[(next(state) % self.vocabulary.len() as u64) as usize];
                    (*id, text.clone())
                };
                *index += 1;
                Piece { ids: vec![id], text }
            }
        };
        generator.emitted += piece.ids.len() as u32;
        Some(piece)
    }

    /// `text` as the tokenizer splits it, one token a piece except where a character spans
    /// tokens (those travel together, so every piece is whole UTF-8); and its token count.
    fn pieces(&self, text: &str) -> (Source, u32) {
        let ids = self.bpe.encode_ordinary(text);
        let natural = ids.len() as u32;
        let mut pieces = Vec::with_capacity(ids.len());
        let mut pending: Vec<u32> = Vec::new();
        for id in ids {
            pending.push(id);
            if let Ok(text) = self.bpe.decode(&pending) {
                pieces.push(Piece { ids: std::mem::take(&mut pending), text });
            }
        }
        (Source::Pieces(pieces.into_iter().peekable()), natural)
    }

    /// The text of a JSON answer: a value of the format's schema, or an object for
    /// `json_object`, derived from `seed`.
    fn structured_answer(
        &self,
        kind: OutputFormatKind,
        format: &OutputFormat,
        seed: u64,
    ) -> Result<String, ShardError> {
        if kind == OutputFormatKind::JsonObject {
            let mut state = seed;
            let words: Vec<&str> = (0..8)
                .map(|_| self.vocabulary[(next(&mut state) % self.vocabulary.len() as u64) as usize].1.trim())
                .collect();
            return Ok(serde_json::json!({"answer": words.join(" ")}).to_string());
        }
        let schema: serde_json::Value =
            serde_json::from_str(&format.schema_json).map_err(|e| ShardError::InvalidSchema(e.to_string()))?;
        if !schema.is_object() {
            return Err(ShardError::InvalidSchema("the schema must be a JSON object".into()));
        }
        let contract = Contract::compile(&schema, format.strict).map_err(ShardError::InvalidSchema)?;
        Ok(contract.value(seed).to_string())
    }
}

/// What a job's output is made of.
enum Source {
    /// Prepared text (a function call, a JSON answer), piece by piece.
    Pieces(std::iter::Peekable<std::vec::IntoIter<Piece>>),
    /// A text answer of `length` tokens: an opener, words, a period; `index` tokens made.
    Text { length: u32, index: u32, state: u64 },
}

/// A job's output, produced token by token.
struct Generator {
    source: Source,
    /// Tokens to produce at most.
    limit: u32,
    emitted: u32,
    /// How the output ends once `limit` tokens are out.
    reason: FinishReason,
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

    fn context_window(&self) -> u32 {
        self.config.context_window
    }

    fn slots(&self) -> (u32, u32) {
        (self.config.slots, self.busy.load(Ordering::Relaxed))
    }

    fn structured_outputs(&self) -> bool {
        self.config.structured_outputs
    }

    fn validate(&self, job: &Job) -> Result<(), ShardError> {
        if !self.config.models.contains(&job.model) {
            return Err(ShardError::UnknownModel(job.model.clone()));
        }
        if job.prompt_len >= self.config.context_window {
            return Err(ShardError::ContextExceeded {
                needed: job.prompt_len.saturating_add(1),
                capacity: self.config.context_window,
            });
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
                    engine_cached: None,
                });
            }

            let mut generator = self.plan_output(&job)?;
            // Continuing a response: the output so far is in the prompt; produce the rest.
            while generator.emitted < job.resumed && self.next_piece(&mut generator).is_some() {}
            let first = started + prefill;
            let mut completion = Vec::new();
            let mut pending = Piece { ids: Vec::new(), text: String::new() };
            let mut index = 0u32;
            while let Some(piece) = self.next_piece(&mut generator) {
                let due = first + self.config.decode_interval * index;
                index += 1;
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
            let reason = generator.reason;
            if !pending.ids.is_empty() && out.send(pending).await.is_err() {
                return Err(ShardError::NotServing);
            }
            let decode = first.elapsed();
            Ok(Outcome { reason, completion, queue, prefill, decode, engine_cached: None })
        })
    }
}

struct BusyGuard<'a>(&'a AtomicU32);

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::Duration;

    use tether_proto::shard::v1::{FinishReason, OutputFormat, OutputFormatKind, Sampling};
    use tokio::sync::mpsc;

    use super::{SimConfig, SimEngine};
    use crate::engine::{Engine, Job};
    use crate::error::ShardError;

    fn engine(context_window: u32) -> SimEngine {
        SimEngine::new(SimConfig {
            models: vec!["tether-sim".into()],
            ttft_base: Duration::ZERO,
            prefill_per_token: Duration::ZERO,
            decode_interval: Duration::ZERO,
            slots: 1,
            output_tokens: 32,
            context_window,
            structured_outputs: true,
        })
    }

    fn job(prompt_len: u32, max_output_tokens: u32, hints: &[(&str, &str)]) -> Job {
        Job {
            session: 1,
            model: "tether-sim".into(),
            prompt_len,
            cached: 0,
            new_tokens: vec![1; prompt_len as usize],
            prefix: Vec::new(),
            prompt_hash: 7,
            resumed: 0,
            sampling: Sampling { max_output_tokens, ..Default::default() },
            tools: None,
            hints: hints.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect::<HashMap<_, _>>(),
            prefill_only: false,
            output_format: None,
        }
    }

    async fn run(engine: &SimEngine, job: Job) -> super::Outcome {
        let (tx, mut rx) = mpsc::channel(1024);
        let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
        engine.validate(&job).expect("valid job");
        let outcome = engine.run(job, tx).await.expect("the job runs");
        drain.await.unwrap();
        outcome
    }

    #[tokio::test]
    async fn a_huge_output_hint_is_generated_lazily_and_cut_by_max_output_tokens() {
        // Issue 11: the sim planned 4,294,967,295 tokens up front and aborted the process.
        let engine = engine(32_768);
        let outcome = run(&engine, job(10, 1, &[("tether_sim_output_tokens", "4294967295")])).await;
        assert_eq!(outcome.completion.len(), 1);
        assert_eq!(outcome.reason, FinishReason::Length);
    }

    #[tokio::test]
    async fn the_output_stops_at_the_context_window() {
        let engine = engine(100);
        let outcome = run(&engine, job(97, 0, &[("tether_sim_output_tokens", "50")])).await;
        assert_eq!(outcome.completion.len(), 3, "only the room left in the window is generated");
        assert_eq!(outcome.reason, FinishReason::Length);
    }

    #[tokio::test]
    async fn a_short_answer_is_complete_and_deterministic() {
        let engine = engine(32_768);
        let first = run(&engine, job(10, 0, &[("tether_sim_output_tokens", "5")])).await;
        let again = run(&engine, job(10, 0, &[("tether_sim_output_tokens", "5")])).await;
        assert_eq!(first.completion.len(), 5);
        assert_eq!(first.reason, FinishReason::Stop);
        assert_eq!(first.completion, again.completion);
        assert_eq!(*first.completion.last().unwrap(), engine.period, "an answer ends with a period");
    }

    #[tokio::test]
    async fn a_resumed_job_continues_with_exactly_the_rest() {
        let engine = engine(32_768);
        let hints = [("tether_sim_output_tokens", "40")];
        let whole = run(&engine, job(10, 30, &hints)).await;
        assert_eq!((whole.completion.len(), whole.reason), (30, FinishReason::Length));
        for done in [0usize, 1, 17, 29] {
            // The prompt now ends with the output so far; the budget counts the rest only.
            let resumed = super::Job {
                prompt_len: 10 + done as u32,
                new_tokens: vec![1; 10 + done],
                resumed: done as u32,
                ..job(10, 30 - done as u32, &hints)
            };
            let rest = run(&engine, resumed).await;
            assert_eq!(rest.completion, whole.completion[done..], "resumed after {done} tokens");
            assert_eq!(rest.reason, FinishReason::Length);
        }
        let natural = run(&engine, job(10, 0, &hints)).await;
        let resumed = super::Job { prompt_len: 15, new_tokens: vec![1; 15], resumed: 5, ..job(10, 0, &hints) };
        let rest = run(&engine, resumed).await;
        assert_eq!(rest.completion, natural.completion[5..]);
        assert_eq!(rest.reason, FinishReason::Stop);
    }

    fn json_job(max_output_tokens: u32, kind: OutputFormatKind, schema: &serde_json::Value) -> Job {
        Job {
            output_format: Some(OutputFormat {
                kind: kind as i32,
                schema_json: schema.to_string(),
                name: "answer".into(),
                strict: true,
            }),
            ..job(10, max_output_tokens, &[])
        }
    }

    async fn text(engine: &SimEngine, job: Job) -> (String, super::Outcome) {
        let (tx, mut rx) = mpsc::channel::<crate::engine::Piece>(1024);
        let collect = tokio::spawn(async move {
            let mut text = String::new();
            while let Some(piece) = rx.recv().await {
                text.push_str(&piece.text);
            }
            text
        });
        engine.validate(&job).expect("valid job");
        let outcome = engine.run(job, tx).await.expect("the job runs");
        (collect.await.unwrap(), outcome)
    }

    #[tokio::test]
    async fn a_json_schema_answer_is_json_that_validates() {
        let engine = engine(32_768);
        let schema = serde_json::json!({"type":"object","properties":{
            "city":{"type":"string","enum":["Paris","Zürich"]},"when":{"type":"string","format":"date"},
            "temps":{"type":"array","items":{"type":"number","minimum":-10,"maximum":40},"minItems":2}},
            "required":["city","when","temps"],"additionalProperties":false});
        let (answer, outcome) = text(&engine, json_job(0, OutputFormatKind::JsonSchema, &schema)).await;
        let value: serde_json::Value = serde_json::from_str(&answer).expect("the answer is JSON");
        assert!(
            jsonschema::options().should_validate_formats(true).build(&schema).unwrap().is_valid(&value),
            "{value}"
        );
        assert_eq!(outcome.reason, FinishReason::Stop);
        assert_eq!(engine.bpe.decode(&outcome.completion).unwrap(), answer, "the pieces are whole characters");

        let (object, _) = text(&engine, json_job(0, OutputFormatKind::JsonObject, &serde_json::Value::Null)).await;
        assert!(serde_json::from_str::<serde_json::Value>(&object).unwrap().is_object());
    }

    #[tokio::test]
    async fn a_json_answer_cut_by_max_output_tokens_ends_at_length() {
        let engine = engine(32_768);
        let schema =
            serde_json::json!({"type":"object","properties":{"a":{"type":"string","minLength":200}},"required":["a"]});
        let (answer, outcome) = text(&engine, json_job(5, OutputFormatKind::JsonSchema, &schema)).await;
        assert_eq!(outcome.reason, FinishReason::Length);
        assert!(outcome.completion.len() <= 5);
        assert!(serde_json::from_str::<serde_json::Value>(&answer).is_err(), "a cut answer is not whole JSON");
    }

    #[test]
    fn an_invalid_schema_is_refused() {
        let engine = engine(100);
        let job = json_job(0, OutputFormatKind::JsonSchema, &serde_json::json!({"type": 12}));
        assert!(matches!(engine.validate(&job), Err(ShardError::InvalidSchema(_))));
    }

    #[test]
    fn a_prompt_that_fills_the_window_is_refused() {
        let engine = engine(100);
        let error = engine.validate(&job(100, 0, &[])).unwrap_err();
        assert!(matches!(error, ShardError::ContextExceeded { capacity: 100, .. }), "{error:?}");
    }
}
