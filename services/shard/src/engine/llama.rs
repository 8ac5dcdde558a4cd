//! The llama engine: real CPU inference through llama.cpp (`llama-cpp-2`) with a GGUF model.
//!
//! Each session is a llama.cpp sequence in one unified KV cache, so a follow-up turn decodes
//! only its new tokens: the shard's bookkeeping (`kv_cache.rs`) says how many leading tokens
//! are held (`Job::cached`), and the engine keeps exactly those cells and decodes the rest.
//! When the context is full, the least recently used idle session is evicted and the shard's
//! bookkeeping drops it too, so the worker's next turn for it gets a cache miss and resends
//! the whole prompt. Active sessions decode together, one batched `llama_decode` per step.
//!
//! Tokenization and the chat template come from the model (`tether-vocabulary`; the worker
//! renders with its `ChatVocabulary`); generation stops at the model's end-of-turn token.

mod runner;
pub mod sequences;
mod state;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

use tether_common::discovery::BoxFuture;
use tokio::sync::{mpsc, oneshot};

use tether_vocabulary as model;

use self::runner::{Command, Event, Import, OnEvict, Runner, Submission};
use super::{Engine, Job, Outcome, Piece};
use crate::config::LlamaConfig;
use crate::error::ShardError;

pub struct LlamaEngine {
    models: Vec<String>,
    config: LlamaConfig,
    commands: std::sync::mpsc::Sender<Command>,
    busy: Arc<AtomicU32>,
}

impl LlamaEngine {
    /// Loads the model and starts the engine thread. Blocks while the model loads (a few
    /// hundred ms for SmolLM2-135M): call it off the async runtime. `on_evict` is called, on
    /// the engine thread, with every session the engine evicts.
    pub fn start(config: LlamaConfig, on_evict: OnEvict) -> Result<LlamaEngine, ShardError> {
        let (commands, receiver) = std::sync::mpsc::channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let busy = Arc::new(AtomicU32::new(0));
        let thread_config = config.clone();
        let thread_busy = busy.clone();
        std::thread::Builder::new()
            .name("llama-engine".into())
            .spawn(move || {
                let started = Instant::now();
                let model = match model::load(&thread_config.model_path, false) {
                    Ok(model) => model,
                    Err(error) => return drop(ready_tx.send(Err(error.into()))),
                };
                let ctx = match runner::context(&model, &thread_config) {
                    Ok(ctx) => ctx,
                    Err(error) => return drop(ready_tx.send(Err(error))),
                };
                tracing::info!(
                    model = %thread_config.model_name,
                    params = model.n_params(),
                    context = ctx.n_ctx(),
                    sequences = thread_config.sequences,
                    threads = thread_config.threads,
                    load_ms = started.elapsed().as_millis() as u64,
                    "llama engine ready"
                );
                let _ = ready_tx.send(Ok(()));
                Runner::new(&model, ctx, thread_config, thread_busy, on_evict).run(receiver);
            })
            .map_err(|error| ShardError::Engine(format!("spawning the engine thread: {error}")))?;
        ready_rx.recv().map_err(|_| ShardError::Engine("the engine thread died while loading".into()))??;
        Ok(LlamaEngine { models: vec![config.model_name.clone()], config, commands, busy })
    }
}

impl Engine for LlamaEngine {
    fn name(&self) -> &'static str {
        "llama"
    }

    fn models(&self) -> &[String] {
        &self.models
    }

    fn context_window(&self) -> u32 {
        // One sequence may fill the whole unified KV cache (n_ctx).
        self.config.context_tokens
    }

    fn slots(&self) -> (u32, u32) {
        (self.config.sequences, self.busy.load(Ordering::Relaxed))
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
            let (events, mut receiver) = mpsc::unbounded_channel();
            let submission = Submission { job, events, queued: Instant::now() };
            self.commands.send(Command::Run(Box::new(submission))).map_err(|_| ShardError::NotServing)?;
            loop {
                let mut piece = match receiver.recv().await {
                    Some(Event::Piece(piece)) => piece,
                    Some(Event::Done(result)) => return result,
                    None => return Err(ShardError::Engine("the engine thread stopped".into())),
                };
                // Coalesce what is already decoded into one chunk.
                let mut done = None;
                while let Ok(event) = receiver.try_recv() {
                    match event {
                        Event::Piece(more) => {
                            piece.ids.extend(more.ids);
                            piece.text.push_str(&more.text);
                        }
                        Event::Done(result) => {
                            done = Some(result);
                            break;
                        }
                    }
                }
                // A closed `out` ends the job: dropping `receiver` tells the engine thread.
                if out.send(piece).await.is_err() {
                    return Err(ShardError::NotServing);
                }
                if let Some(result) = done {
                    return result;
                }
            }
        })
    }

    fn drop_session(&self, session: u64) {
        let _ = self.commands.send(Command::Drop(session));
    }

    fn export_session(&self, session: u64) -> BoxFuture<'_, Result<Option<Vec<u8>>, ShardError>> {
        Box::pin(async move {
            let (reply, result) = oneshot::channel();
            self.commands.send(Command::Export { session, reply }).map_err(|_| ShardError::NotServing)?;
            result.await.map_err(|_| ShardError::Engine("the engine thread stopped".into()))?
        })
    }

    fn import_session(&self, session: u64, tokens: Vec<u32>, state: Vec<u8>) -> BoxFuture<'_, Result<(), ShardError>> {
        Box::pin(async move {
            let (reply, result) = oneshot::channel();
            let import = Import { session, tokens, state, reply };
            self.commands.send(Command::Import(Box::new(import))).map_err(|_| ShardError::NotServing)?;
            result.await.map_err(|_| ShardError::Engine("the engine thread stopped".into()))?
        })
    }
}
