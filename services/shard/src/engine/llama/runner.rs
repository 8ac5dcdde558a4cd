//! The engine thread: owns the llama.cpp context, admits jobs onto sequences, and runs one
//! batched `decode` per step for every active job (a token each for generating jobs, a prompt
//! chunk for prefilling ones), then samples each job's next token from its own logits row.
//!
//! A llama.cpp context is not `Sync` and every call on it may block for a long time, so one
//! dedicated std thread owns it; jobs arrive over a channel and results leave over per-job
//! channels, never blocking this thread on a slow client.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::{Duration, Instant};

use llama_cpp_2::DecodeError;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use tether_proto::shard::v1::{FinishReason, Sampling};
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::oneshot;

use super::sequences::{Resume, SequenceTable};
use super::state;
use crate::config::LlamaConfig;
use crate::engine::{Job, Outcome, Piece};
use crate::error::ShardError;
use tether_vocabulary::{self as model, Utf8Stream};

/// Prompt tokens per step while other jobs are generating: bounds the pause a long prefill
/// puts between their tokens (about 0.5 s on 2 cores for SmolLM2-135M).
const PREFILL_CHUNK_WHILE_DECODING: usize = 128;

/// A request to the engine thread.
pub enum Command {
    Run(Box<Submission>),
    /// The shard's bookkeeping dropped the session: free its sequence.
    Drop(u64),
    /// Save an idle session's sequence state (`None`: not held, or mid-turn).
    Export {
        session: u64,
        reply: oneshot::Sender<Result<Option<Vec<u8>>, ShardError>>,
    },
    /// Load a session exported by another shard into a sequence of its own.
    Import(Box<Import>),
}

pub struct Import {
    pub session: u64,
    /// What the shard's bookkeeping will hold: the state's tokens, then at most one pending.
    pub tokens: Vec<u32>,
    pub state: Vec<u8>,
    pub reply: oneshot::Sender<Result<(), ShardError>>,
}

pub struct Submission {
    pub job: Job,
    pub events: UnboundedSender<Event>,
    pub queued: Instant,
}

/// What the engine thread reports about one job.
pub enum Event {
    Piece(Piece),
    Done(Result<Outcome, ShardError>),
}

/// Called with a session whose sequence the engine evicted, so the shard's bookkeeping drops it
/// too and the next turn is answered with a cache miss.
pub type OnEvict = Box<dyn Fn(u64) + Send>;

struct Active {
    session: u64,
    seq: i32,
    events: UnboundedSender<Event>,
    sampler: LlamaSampler,
    /// Prompt tokens to decode, and how many are decoded.
    prompt: Vec<u32>,
    offset: usize,
    /// The sampled token to feed back next step.
    next: Option<u32>,
    completion: Vec<u32>,
    max_new: usize,
    prefill_only: bool,
    text: Utf8Stream,
    queue: Duration,
    admitted: Instant,
    first_token: Option<Instant>,
}

impl Active {
    /// Context cells this job may still take.
    fn reserved(&self) -> usize {
        (self.prompt.len() - self.offset) + self.max_new.saturating_sub(self.completion.len())
    }
}

pub struct Runner<'m> {
    model: &'m LlamaModel,
    ctx: LlamaContext<'m>,
    batch: LlamaBatch<'static>,
    config: LlamaConfig,
    table: SequenceTable,
    active: Vec<Active>,
    waiting: VecDeque<Submission>,
    busy: Arc<AtomicU32>,
    on_evict: OnEvict,
}

/// Creates the context: one unified KV cache of `context_tokens` cells shared by up to
/// `sequences` sequences (see dependencies.md §4: a unified cache lets any session grow to the
/// whole context and keeps `state_seq` blobs portable between shards).
pub fn context<'m>(model: &'m LlamaModel, config: &LlamaConfig) -> Result<LlamaContext<'m>, ShardError> {
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(config.context_tokens))
        .with_n_batch(config.batch_tokens)
        .with_n_ubatch(config.batch_tokens)
        .with_n_seq_max(config.sequences)
        .with_kv_unified(true)
        .with_n_threads(config.threads as i32)
        .with_n_threads_batch(config.threads as i32);
    model
        .new_context(model::backend()?, params)
        .map_err(|error| ShardError::Engine(format!("creating the llama.cpp context: {error}")))
}

impl<'m> Runner<'m> {
    pub fn new(
        model: &'m LlamaModel,
        ctx: LlamaContext<'m>,
        config: LlamaConfig,
        busy: Arc<AtomicU32>,
        on_evict: OnEvict,
    ) -> Self {
        Runner {
            batch: LlamaBatch::new(config.batch_tokens as usize, 1),
            table: SequenceTable::new(config.sequences),
            model,
            ctx,
            config,
            active: Vec::new(),
            waiting: VecDeque::new(),
            busy,
            on_evict,
        }
    }

    /// Serves commands until every sender is gone.
    pub fn run(mut self, commands: Receiver<Command>) {
        loop {
            if self.active.is_empty() && self.waiting.is_empty() {
                match commands.recv() {
                    Ok(command) => self.command(command),
                    Err(_) => return,
                }
            }
            loop {
                match commands.try_recv() {
                    Ok(command) => self.command(command),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) if self.active.is_empty() && self.waiting.is_empty() => {
                        return;
                    }
                    Err(TryRecvError::Disconnected) => break,
                }
            }
            self.admit_waiting();
            if self.active.is_empty() {
                // With nothing running every sequence is evictable, so every job fits: anything
                // still waiting here would wait forever.
                debug_assert!(self.waiting.is_empty(), "a job waits on an idle engine");
                for submission in self.waiting.drain(..) {
                    let _ = submission
                        .events
                        .send(Event::Done(Err(ShardError::Engine("job could not be scheduled".into()))));
                }
            } else {
                self.step();
            }
            self.busy.store(self.active.len() as u32, Ordering::Relaxed);
        }
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Run(submission) => self.waiting.push_back(*submission),
            Command::Drop(session) => {
                if self.table.get(session).is_some_and(|slot| !slot.active) {
                    self.free(session);
                }
            }
            Command::Export { session, reply } => {
                let _ = reply.send(self.export(session));
            }
            Command::Import(import) => {
                let Import { session, tokens, state, reply } = *import;
                let _ = reply.send(self.import(session, &tokens, &state));
            }
        }
    }

    // === session migration ===

    fn export(&mut self, session: u64) -> Result<Option<Vec<u8>>, ShardError> {
        match self.table.get(session) {
            // A running turn is changing the cells: the session is not exportable now.
            Some(slot) if !slot.active => state::save(&self.ctx, slot.seq, &slot.tokens).map(Some),
            _ => Ok(None),
        }
    }

    /// Loads an exported session into a sequence of its own, replacing what it held here and
    /// evicting least recently used idle sessions for room, as admission does.
    fn import(&mut self, session: u64, tokens: &[u32], state: &[u8]) -> Result<(), ShardError> {
        if self.table.get(session).is_some_and(|slot| slot.active) {
            return Err(ShardError::IncompatibleState("the session has a turn running here".into()));
        }
        self.free(session);
        let capacity = self.config.context_tokens as usize;
        if tokens.len() > capacity {
            return Err(ShardError::ContextExceeded { needed: tokens.len() as u32, capacity: capacity as u32 });
        }
        loop {
            let reserved: usize = self.active.iter().map(Active::reserved).sum();
            if self.table.has_free() && self.table.held_tokens() + reserved + tokens.len() <= capacity {
                break;
            }
            match self.table.least_recently_used(Some(session)) {
                Some(victim) => self.evict(victim),
                None => return Err(ShardError::Engine("no room for the imported session".into())),
            }
        }
        let seq = self.table.allocate(session).expect("a free sequence was ensured").seq;
        let loaded = match state::load(&mut self.ctx, seq, state, tokens.len()) {
            Ok(loaded) => loaded,
            Err(error) => {
                self.free(session);
                return Err(error);
            }
        };
        // The cells hold the session's tokens, possibly but for its last sampled one (pending).
        if !tokens.starts_with(&loaded) || tokens.len() - loaded.len() > 1 {
            self.free(session);
            return Err(ShardError::IncompatibleState(format!(
                "the state holds {} tokens that do not lead the session's {}",
                loaded.len(),
                tokens.len()
            )));
        }
        let slot = self.table.get_mut(session).expect("allocated above");
        slot.pending = tokens[loaded.len()..].to_vec();
        slot.tokens = loaded;
        self.table.touch(session);
        tracing::debug!(session = %format_args!("{session:016x}"), seq, tokens = tokens.len(), bytes = state.len(), "llama session imported");
        Ok(())
    }

    // === admission ===

    fn admit_waiting(&mut self) {
        let mut still_waiting = VecDeque::new();
        while let Some(submission) = self.waiting.pop_front() {
            match self.admit(submission) {
                Ok(None) => {}
                Ok(Some(submission)) => still_waiting.push_back(submission),
                Err((submission, error)) => {
                    let _ = submission.events.send(Event::Done(Err(error)));
                }
            }
        }
        self.waiting = still_waiting;
    }

    /// Starts `submission` on its session's sequence; gives it back if it must wait.
    #[allow(clippy::result_large_err)]
    fn admit(&mut self, submission: Submission) -> Result<Option<Submission>, (Submission, ShardError)> {
        let job = &submission.job;
        let session = job.session;
        if self.table.get(session).is_some_and(|slot| slot.active) {
            return Ok(Some(submission)); // one turn at a time per session
        }
        let need_logits = !job.prefill_only;
        let resume = match (job.cached, self.table.get(session)) {
            (0, _) => Resume { keep: 0, decode: job.new_tokens.clone() },
            (cached, Some(slot)) => match slot.resume(cached, &job.new_tokens, need_logits) {
                Some(resume) => resume,
                None => {
                    self.free(session);
                    return Err((submission, ShardError::SequenceLost));
                }
            },
            (_, None) => return Err((submission, ShardError::SequenceLost)),
        };
        let capacity = self.config.context_tokens as usize;
        let prompt_len = resume.keep + resume.decode.len();
        if prompt_len > capacity || (need_logits && prompt_len == 0) {
            let needed = prompt_len.max(1) as u32;
            return Err((submission, ShardError::ContextExceeded { needed, capacity: capacity as u32 }));
        }
        let max_new = if job.prefill_only {
            0
        } else {
            let requested = match job.sampling.max_output_tokens {
                0 => self.config.max_output_tokens,
                n => n,
            };
            (requested as usize).min(capacity - prompt_len)
        };

        // Room: a sequence id, and context cells for the prompt and the whole answer.
        let held_by_session = self.table.get(session).map_or(0, |slot| slot.tokens.len());
        let needed = resume.decode.len() + max_new;
        loop {
            let has_sequence = self.table.get(session).is_some() || self.table.has_free();
            let reserved: usize = self.active.iter().map(Active::reserved).sum();
            let used = self.table.held_tokens() - (held_by_session - resume.keep.min(held_by_session)) + reserved;
            if has_sequence && used + needed <= capacity {
                break;
            }
            match self.table.least_recently_used(Some(session)) {
                Some(victim) => self.evict(victim),
                None => return Ok(Some(submission)), // wait for running jobs to finish
            }
        }

        let slot = match self.table.get_mut(session) {
            Some(slot) => slot,
            None => self.table.allocate(session).expect("a free sequence was ensured"),
        };
        let seq = slot.seq;
        if resume.keep < slot.tokens.len() {
            if let Err(error) = self.ctx.kv_cache_seq_rm(seq, Some(resume.keep as u32), None) {
                // llama.cpp refused a partial removal: start the sequence over.
                tracing::warn!(%error, "partial kv removal failed; clearing the sequence");
                self.free(session);
                return Err((submission, ShardError::SequenceLost));
            }
            slot.tokens.truncate(resume.keep);
        }
        slot.pending.clear();
        slot.active = true;
        tracing::debug!(
            session = %format_args!("{session:016x}"),
            seq,
            kept = resume.keep,
            decode = resume.decode.len(),
            max_new,
            "llama job admitted"
        );
        let sampler = sampler(&job.sampling, job.prompt_hash);
        self.active.push(Active {
            session,
            seq,
            sampler,
            prompt: resume.decode,
            offset: 0,
            next: None,
            completion: Vec::new(),
            max_new,
            prefill_only: job.prefill_only,
            text: Utf8Stream::default(),
            queue: submission.queued.elapsed(),
            admitted: Instant::now(),
            first_token: None,
            events: submission.events,
        });
        Ok(None)
    }

    /// Evicts an idle session: frees its sequence and tells the shard's bookkeeping.
    fn evict(&mut self, session: u64) {
        tracing::debug!(session = %format_args!("{session:016x}"), "llama sequence evicted");
        metrics::counter!(crate::metrics::CACHE_EVICTIONS).increment(1);
        self.free(session);
        (self.on_evict)(session);
    }

    fn free(&mut self, session: u64) {
        if let Some(slot) = self.table.remove(session) {
            // Removing a whole sequence always succeeds.
            let _ = self.ctx.kv_cache_seq_rm(slot.seq, None, None);
        }
    }

    // === one step ===

    /// Decodes one batch over every active job, then samples and streams.
    fn step(&mut self) {
        // Jobs with prompt left to decode that have nothing to do (prefill-only with an empty
        // prompt) finish at once.
        self.finish_where(|job| job.prefill_only && job.offset == job.prompt.len(), Ok(FinishReason::Stop));

        let n_batch = self.config.batch_tokens as usize;
        let decoding = self.active.iter().filter(|job| job.next.is_some()).count();
        let mut prefill_budget = n_batch.saturating_sub(decoding);
        if decoding > 0 {
            prefill_budget = prefill_budget.min(PREFILL_CHUNK_WHILE_DECODING);
        }

        // (job index, tokens added, logits row)
        let mut plan: Vec<(usize, Vec<u32>, Option<i32>)> = Vec::new();
        self.batch.clear();
        for (index, job) in self.active.iter().enumerate() {
            let position = self.table.get(job.session).map_or(0, |slot| slot.tokens.len()) as i32;
            let added = if let Some(token) = job.next {
                vec![token]
            } else if job.offset < job.prompt.len() && prefill_budget > 0 {
                let take = (job.prompt.len() - job.offset).min(prefill_budget);
                prefill_budget -= take;
                job.prompt[job.offset..job.offset + take].to_vec()
            } else {
                continue;
            };
            let last_of_prompt = job.next.is_some() || job.offset + added.len() == job.prompt.len();
            let mut row = None;
            for (i, &token) in added.iter().enumerate() {
                let logits = last_of_prompt && i + 1 == added.len();
                if logits {
                    row = Some(self.batch.n_tokens());
                }
                self.batch
                    .add(LlamaToken(token as i32), position + i as i32, &[job.seq], logits)
                    .expect("the batch holds n_batch tokens");
            }
            plan.push((index, added, row));
        }
        if plan.is_empty() {
            return;
        }

        if let Err(error) = self.decode() {
            tracing::warn!(%error, jobs = plan.len(), "llama decode failed");
            let failed: Vec<usize> = plan.iter().map(|(index, _, _)| *index).collect();
            for &index in failed.iter().rev() {
                let job = self.active.swap_remove(index);
                // The sequence's cells are in an unknown state: start it over next time.
                self.free(job.session);
                let _ = job.events.send(Event::Done(Err(ShardError::Engine(format!("decode failed: {error}")))));
            }
            return;
        }

        // The batch is in the KV cache now.
        for (index, added, _) in &plan {
            let job = &mut self.active[*index];
            if job.next.take().is_none() {
                job.offset += added.len();
            }
            if let Some(slot) = self.table.get_mut(job.session) {
                slot.tokens.extend_from_slice(added);
            }
        }

        let mut finished: Vec<(usize, Result<FinishReason, ShardError>)> = Vec::new();
        for (index, _, row) in plan {
            let Some(row) = row else { continue };
            let job = &mut self.active[index];
            if job.prefill_only {
                finished.push((index, Ok(FinishReason::Stop)));
                continue;
            }
            let token = job.sampler.sample(&self.ctx, row);
            job.first_token.get_or_insert_with(Instant::now);
            let vocab = self.model.vocab();
            if vocab.is_eog(token) || vocab.is_control(token) {
                finished.push((index, Ok(FinishReason::Stop)));
                continue;
            }
            let id = token.0 as u32;
            job.completion.push(id);
            let mut bytes = Vec::new();
            model::piece_bytes(self.model, id, &mut bytes);
            let text = job.text.push(&bytes);
            if job.events.send(Event::Piece(Piece { ids: vec![id], text })).is_err() {
                // The caller went away: stop generating for it.
                finished.push((index, Err(ShardError::NotServing)));
                continue;
            }
            if job.completion.len() >= job.max_new {
                finished.push((index, Ok(FinishReason::Length)));
            } else {
                job.next = Some(id);
            }
        }
        finished.sort_by_key(|(index, _)| std::cmp::Reverse(*index));
        for (index, result) in finished {
            self.finish(index, result);
        }
    }

    /// Decodes the batch, evicting idle sequences while llama.cpp finds no room for it.
    fn decode(&mut self) -> Result<(), DecodeError> {
        loop {
            match self.ctx.decode(&mut self.batch) {
                Err(DecodeError::NoKvCacheSlot) => match self.table.least_recently_used(None) {
                    Some(victim) => self.evict(victim),
                    None => return Err(DecodeError::NoKvCacheSlot),
                },
                result => return result,
            }
        }
    }

    fn finish_where(&mut self, done: impl Fn(&Active) -> bool, result: Result<FinishReason, ShardError>) {
        let indices: Vec<usize> = (0..self.active.len()).filter(|&i| done(&self.active[i])).collect();
        for &index in indices.iter().rev() {
            let result = match &result {
                Ok(reason) => Ok(*reason),
                Err(_) => Err(ShardError::NotServing),
            };
            self.finish(index, result);
        }
    }

    /// Ends job `index`: the session's sequence becomes idle, the caller gets its outcome.
    fn finish(&mut self, index: usize, result: Result<FinishReason, ShardError>) {
        let mut job = self.active.swap_remove(index);
        if let Some(slot) = self.table.get_mut(job.session) {
            slot.active = false;
            // A token sampled but not fed back (the answer was cut) is part of what the shard's
            // bookkeeping holds: keep it to decode first next turn.
            slot.pending = job.next.take().into_iter().collect();
            if let (Ok(FinishReason::Length), Some(&last)) = (&result, job.completion.last()) {
                slot.pending = vec![last];
            }
        }
        self.table.touch(job.session);
        let rest = job.text.finish();
        if !rest.is_empty() {
            let _ = job.events.send(Event::Piece(Piece { ids: Vec::new(), text: rest }));
        }
        let now = Instant::now();
        let first = job.first_token.unwrap_or(now);
        let outcome = result.map(|reason| Outcome {
            reason,
            completion: std::mem::take(&mut job.completion),
            queue: job.queue,
            prefill: first - job.admitted,
            decode: now - first,
            engine_cached: None,
        });
        let _ = job.events.send(Event::Done(outcome));
    }
}

/// The sampler for a job: greedy at temperature 0, else temperature then nucleus (`top_p`)
/// sampling, seeded from the prompt's hash so a prompt replays identically.
fn sampler(sampling: &Sampling, seed: u64) -> LlamaSampler {
    // The Responses API defaults: temperature 1, top_p 1.
    let temperature = sampling.temperature.unwrap_or(1.0);
    if temperature <= 0.0 {
        return LlamaSampler::greedy();
    }
    let mut chain = vec![LlamaSampler::temp(temperature)];
    if let Some(top_p) = sampling.top_p.filter(|p| *p > 0.0 && *p < 1.0) {
        chain.push(LlamaSampler::top_p(top_p, 1));
    }
    chain.push(LlamaSampler::dist((seed ^ (seed >> 32)) as u32));
    LlamaSampler::chain_simple(chain)
}
