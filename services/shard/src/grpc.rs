//! The `tether.shard.v1.Shard` service: KV-cache bookkeeping around an [`Engine`].

use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use opentelemetry::KeyValue;

use tether_common::ops::Readiness;
use tether_common::tokens::PrefixHash;
use tether_proto::shard::v1::generate_chunk::Kind;
use tether_proto::shard::v1::shard_server::Shard;
use tether_proto::shard::v1::{
    CacheMiss, DropSessionRequest, DropSessionResponse, ExportSessionRequest, ExportSessionResponse, Finished,
    GenerateChunk, GenerateRequest, ImportSessionRequest, ImportSessionResponse, InfoRequest, InfoResponse,
    OutputFormatKind, Timings, Tokens, Usage,
};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{Instrument, field};

use crate::engine::{Engine, Job};
use crate::kv_cache::{KvCache, Lookup};
use crate::metrics as m;
use crate::migration;

#[derive(Clone)]
pub struct ShardService {
    id: String,
    engine: Arc<dyn Engine>,
    cache: Arc<KvCache>,
    serving: Readiness,
}

impl ShardService {
    pub fn new(id: String, engine: Arc<dyn Engine>, cache: Arc<KvCache>, serving: Readiness) -> Self {
        ShardService { id, engine, cache, serving }
    }

    /// Hands every held session to its next owner (see [`migration::hand_off`]).
    pub async fn hand_off(&self, peers: &crate::peers::ShardPeers, deadline: std::time::Instant) -> usize {
        migration::hand_off(self.engine.as_ref(), &self.cache, peers, deadline).await
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<GenerateChunk, Status>> + Send>>;

/// Records the engine's queue, prefill and decode as children of `shard.generate`, at the
/// times they happened (the engine reports their durations when the job ends).
fn stages(started: SystemTime, outcome: &crate::engine::Outcome) {
    let completion = outcome.completion.len();
    tracing::Span::current().record("completion_tokens", completion);
    let queued = started + outcome.queue;
    let prefilled = queued + outcome.prefill;
    tether_common::trace::stage("shard.queue", started, queued, Vec::new());
    tether_common::trace::stage("shard.prefill", queued, prefilled, Vec::new());
    let decode = vec![KeyValue::new("completion_tokens", completion as i64)];
    tether_common::trace::stage("shard.decode", prefilled, prefilled + outcome.decode, decode);
}

fn single(chunk: GenerateChunk) -> ChunkStream {
    Box::pin(tokio_stream::once(Ok(chunk)))
}

#[tonic::async_trait]
impl Shard for ShardService {
    type GenerateStream = ChunkStream;

    async fn generate(&self, request: Request<GenerateRequest>) -> Result<Response<ChunkStream>, Status> {
        // `shard.generate` lasts until the generation ends (the task below holds it); no await
        // happens while it is entered here.
        let span = tracing::info_span!(
            "shard.generate",
            otel.kind = "server",
            node = %self.id,
            session = %format_args!("{:016x}", request.get_ref().session),
            cached = field::Empty,
            new_tokens = field::Empty,
            completion_tokens = field::Empty,
        );
        tether_common::trace::set_parent(&span, tether_common::trace::from_metadata(request.metadata()));
        let _entered = span.enter();
        if !self.serving.is_ready() {
            return Err(crate::ShardError::NotServing.into());
        }
        let request = request.into_inner();
        let session = request.session;
        let resumed = request.resume_tokens;
        if resumed as usize > request.tokens.len() {
            return Err(Status::invalid_argument("resume_tokens exceeds the tokens sent"));
        }
        // The seed of a resumed generation is the prompt's without the output it resumes.
        let fresh = request.tokens.len() - resumed as usize;

        // Resolve what the KV cache already holds for this session. After a claim, the session
        // goes on with every token after its prefix (`appended`), whatever the engine reuses.
        let mut appended = Vec::new();
        let (cached, prompt_hash, prompt_len, new_tokens, full_prompt) = if request.full {
            let cached = self.cache.longest_prefix(session, request.cache_scope, &request.tokens);
            let hash = PrefixHash::of(&request.tokens[..fresh]);
            let new_tokens = request.tokens[cached as usize..].to_vec();
            (cached, hash, request.tokens.len() as u32, new_tokens, Some(request.tokens))
        } else {
            match self.cache.lookup_prefix(session, request.prefix_len, request.prefix_hash, &request.tokens) {
                Lookup::Hit { cached, prompt_hash } => {
                    let prompt_len = cached + request.tokens.len() as u32;
                    let prompt_hash = if resumed == 0 {
                        prompt_hash
                    } else {
                        let mut seed = if cached == 0 {
                            PrefixHash::default()
                        } else {
                            PrefixHash::from_value(request.prefix_hash)
                        };
                        seed.extend(&request.tokens[..fresh]);
                        seed
                    };
                    // Blocks past the claimed prefix that another session left here.
                    let held = self.cache.extend_claim(session, request.cache_scope, cached, &request.tokens);
                    let new_tokens = request.tokens[(held - cached) as usize..].to_vec();
                    appended = request.tokens;
                    (held, prompt_hash, prompt_len, new_tokens, None)
                }
                Lookup::Miss { held } => {
                    metrics::counter!(m::CACHE_MISSES).increment(1);
                    tracing::debug!(held, claimed = request.prefix_len, "kv cache miss");
                    return Ok(Response::new(single(GenerateChunk {
                        kind: Some(Kind::CacheMiss(CacheMiss { held_len: held })),
                    })));
                }
            }
        };
        if cached > 0 {
            metrics::counter!(m::CACHE_HITS).increment(1);
        }
        span.record("cached", cached).record("new_tokens", new_tokens.len());

        // An engine that sends the whole prompt each turn gets the held prefix from the
        // bookkeeping (the prompt itself when the worker sent all of it).
        let prefix = match (&full_prompt, self.engine.wants_prefix()) {
            (_, false) => Vec::new(),
            (Some(prompt), true) => prompt[..cached as usize].to_vec(),
            (None, true) => {
                let mut held = self.cache.export(session).unwrap_or_default();
                if held.len() < cached as usize {
                    // Dropped between the lookup and now: the worker resends everything.
                    metrics::counter!(m::CACHE_MISSES).increment(1);
                    return Ok(Response::new(single(GenerateChunk {
                        kind: Some(Kind::CacheMiss(CacheMiss { held_len: 0 })),
                    })));
                }
                held.truncate(cached as usize);
                held
            }
        };
        let job = Job {
            session,
            model: request.model,
            prompt_len,
            cached,
            new_tokens,
            prefix,
            prompt_hash: prompt_hash.value(),
            resumed,
            sampling: request.sampling.unwrap_or_default(),
            tools: request.tools,
            hints: request.hints,
            prefill_only: request.prefill_only,
            output_format: request.output_format,
        };
        let wants_json = job.output_format.as_ref().is_some_and(|f| f.kind() != OutputFormatKind::Text);
        if wants_json && !self.engine.structured_outputs() {
            return Err(crate::ShardError::OutputFormatUnsupported(self.engine.name()).into());
        }
        self.engine.validate(&job)?;

        let (tx, rx) = mpsc::channel(64);
        let engine = self.engine.clone();
        let cache = self.cache.clone();
        let (prefix_len, prefix_hash, scope) = (request.prefix_len, request.prefix_hash, request.cache_scope);
        let task = async move {
            let (piece_tx, mut piece_rx) = mpsc::channel::<crate::engine::Piece>(64);
            let forward_tx = tx.clone();
            let forward = tokio::spawn(async move {
                while let Some(piece) = piece_rx.recv().await {
                    let chunk = GenerateChunk { kind: Some(Kind::Tokens(Tokens { ids: piece.ids, text: piece.text })) };
                    if forward_tx.send(Ok(chunk)).await.is_err() {
                        break;
                    }
                }
            });
            let (uncached, cached) = (job.prompt_len - job.cached, job.cached);
            let started = SystemTime::now();
            let result = engine.run(job, piece_tx).await;
            let _ = forward.await;
            match result {
                Ok(outcome) => {
                    match full_prompt {
                        Some(mut prompt) => {
                            prompt.extend_from_slice(&outcome.completion);
                            cache.replace(session, scope, prompt);
                        }
                        None => {
                            cache.extend(session, scope, prefix_len, prefix_hash, &[&appended, &outcome.completion])
                        }
                    }
                    metrics::counter!(m::GENERATE_TOTAL, "outcome" => "ok").increment(1);
                    metrics::counter!(m::PREFILL_TOKENS).increment(u64::from(uncached));
                    metrics::counter!(m::CACHED_TOKENS).increment(u64::from(cached));
                    metrics::counter!(m::DECODE_TOKENS).increment(outcome.completion.len() as u64);
                    metrics::histogram!(m::QUEUE_SECONDS).record(outcome.queue.as_secs_f64());
                    metrics::histogram!(m::TTFT_SECONDS).record(outcome.prefill.as_secs_f64());
                    stages(started, &outcome);
                    let finished = Finished {
                        reason: outcome.reason as i32,
                        usage: Some(Usage {
                            prompt_tokens: prompt_len,
                            cached_tokens: outcome.engine_cached.unwrap_or(cached).min(prompt_len),
                            completion_tokens: outcome.completion.len() as u32,
                        }),
                        timings: Some(Timings {
                            queue_us: outcome.queue.as_micros() as u64,
                            prefill_us: outcome.prefill.as_micros() as u64,
                            decode_us: outcome.decode.as_micros() as u64,
                        }),
                    };
                    let _ = tx.send(Ok(GenerateChunk { kind: Some(Kind::Finished(finished)) })).await;
                }
                Err(crate::ShardError::SequenceLost) => {
                    // Evicted between the lookup and the engine: the worker resends everything.
                    metrics::counter!(m::CACHE_MISSES).increment(1);
                    cache.drop_session(session);
                    let _ = tx.send(Ok(GenerateChunk { kind: Some(Kind::CacheMiss(CacheMiss { held_len: 0 })) })).await;
                }
                Err(error) => {
                    metrics::counter!(m::GENERATE_TOTAL, "outcome" => "error").increment(1);
                    let _ = tx.send(Err(error.into())).await;
                }
            }
        };
        tokio::spawn(task.instrument(span.clone()));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn drop_session(
        &self,
        request: Request<DropSessionRequest>,
    ) -> Result<Response<DropSessionResponse>, Status> {
        let session = request.into_inner().session;
        let dropped = self.cache.drop_session(session);
        self.engine.drop_session(session);
        Ok(Response::new(DropSessionResponse { dropped }))
    }

    #[tracing::instrument(skip_all, fields(session = %format_args!("{:016x}", request.get_ref().session)))]
    async fn export_session(
        &self,
        request: Request<ExportSessionRequest>,
    ) -> Result<Response<ExportSessionResponse>, Status> {
        let exported = migration::export(self.engine.as_ref(), &self.cache, request.into_inner().session).await?;
        Ok(Response::new(exported.unwrap_or_default()))
    }

    #[tracing::instrument(skip_all, fields(session = %format_args!("{:016x}", request.get_ref().session)))]
    async fn import_session(
        &self,
        request: Request<ImportSessionRequest>,
    ) -> Result<Response<ImportSessionResponse>, Status> {
        // A draining or fenced shard takes no sessions: they would leave again with it.
        if !self.serving.is_ready() {
            return Err(crate::ShardError::NotServing.into());
        }
        let request = request.into_inner();
        let (tokens, bytes) = (request.tokens.len(), request.state.len());
        let held_len = migration::import(self.engine.as_ref(), &self.cache, request).await.inspect_err(|error| {
            tracing::warn!(%error, tokens, bytes, "session import refused");
        })?;
        tracing::debug!(tokens, bytes, "session imported");
        Ok(Response::new(ImportSessionResponse { imported: true, held_len }))
    }

    async fn info(&self, _request: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        let (slots, slots_busy) = self.engine.slots();
        let stats = self.cache.stats();
        Ok(Response::new(InfoResponse {
            shard_id: self.id.clone(),
            engine: self.engine.name().to_owned(),
            models: self.engine.models().to_vec(),
            slots,
            slots_busy,
            cache_budget_tokens: self.cache.budget(),
            cache_tokens: stats.tokens,
            cache_sessions: stats.sessions,
            cache_hits: stats.hits,
            cache_misses: stats.misses,
            context_window: self.engine.context_window(),
            structured_outputs: self.engine.structured_outputs(),
        }))
    }
}
