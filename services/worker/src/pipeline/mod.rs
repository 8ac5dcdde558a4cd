//! The per-turn pipeline (design §3): resolve, validate, safety-check, render, infer,
//! stream out, commit. Events are serialized here, once; the edge relays the bytes.

pub mod infer;
pub mod output;
pub mod prepare;
pub mod tool_stream;

use std::sync::Arc;
use std::time::Instant;

use serde_json::value::RawValue;
use serde_json::{Value, json};
use tether_common::ResponseId;
use tether_common::tokens::PrefixHash;
use tether_proto::shard::v1::FinishReason;
use tether_proto::worker::v1::{Delivery, Resume, TurnEvent, TurnRequest, turn_event};
use tracing::Instrument;

use self::infer::Generation;
use self::output::OutputBuilder;
use self::prepare::Prepared;
use crate::api::events::{Emitter, ResponseField, TurnSink};
use crate::api::request::CreateRequest;
use crate::api::response::{ResponseTemplate, now_unix, usage};
use crate::config::ReplicationMode;
use crate::context::WorkerContext;
use crate::error::WorkerError;
use crate::in_flight::Registration;
use crate::metrics as m;
use crate::replication;
use crate::session::{ResponseState, Segments};

/// Bodies larger than this are prepared on the blocking pool (parsing, safety and
/// tokenization of a long stateless history take milliseconds).
const INLINE_PREPARE_BYTES: usize = 32 * 1024;

/// Runs one turn, sending its events to `sink` (inside the caller's `worker.turn` span).
pub async fn run_turn(ctx: Arc<WorkerContext>, turn: TurnRequest, sink: TurnSink) {
    let started = Instant::now();
    let final_only = turn.delivery == Delivery::Final as i32;
    let stream_id = (!turn.stream_id.is_empty()).then(|| turn.stream_id.clone());
    let prepared = prepare_turn(&ctx, &turn, prepare::prepare).await;
    let prepared = match prepared {
        Ok(prepared) => prepared,
        Err(error) => {
            metrics::counter!(m::TURNS, "outcome" => "rejected").increment(1);
            let _ = sink.send(Ok(TurnEvent { kind: Some(turn_event::Kind::Error(error.api_error())) })).await;
            return;
        }
    };
    let mut emitter = Emitter::new(sink.clone(), stream_id, final_only);
    let outcome = execute(&ctx, &turn, prepared, &mut emitter).await;
    let label = match outcome {
        Outcome::Completed => "completed",
        Outcome::Incomplete => "incomplete",
        Outcome::Failed => "failed",
        Outcome::Cancelled => "cancelled",
        Outcome::Closed => "closed",
    };
    metrics::counter!(m::TURNS, "outcome" => label).increment(1);
    metrics::histogram!(m::TURN_SECONDS).record(started.elapsed().as_secs_f64());
}

/// Counts the input tokens of a create body (`POST /v1/responses/input_tokens`): the prompt
/// the turn would send (the chain's tokens and the newly rendered ones), which is what its
/// `usage.input_tokens` reports. Errors are the ones the create would get.
pub async fn count_input_tokens(ctx: &Arc<WorkerContext>, turn: &TurnRequest) -> Result<u32, WorkerError> {
    let prepared = prepare_turn(ctx, turn, prepare::plan).await?;
    Ok(prepared_prompt_len(&prepared))
}

/// How the rest of a turn's preparation runs: [`prepare::prepare`] for a turn,
/// [`prepare::plan`] for a count.
type PrepareStep = fn(&WorkerContext, &TurnRequest, CreateRequest) -> Result<Prepared, WorkerError>;

/// Parses the request, pulls a parent that moved here from its previous owner, then runs the
/// rest of the preparation, `step` (on the blocking pool for large bodies).
async fn prepare_turn(
    ctx: &Arc<WorkerContext>,
    turn: &TurnRequest,
    step: PrepareStep,
) -> Result<Prepared, WorkerError> {
    let parse = |ctx: &WorkerContext, turn: &TurnRequest| {
        tracing::info_span!("worker.parse", bytes = turn.body.len())
            .in_scope(|| CreateRequest::parse(&turn.body, &ctx.default_model))
    };
    // A parent that is not here: pulled from a peer first (one extra round trip).
    let to_pull = |ctx: &WorkerContext, turn: &TurnRequest, request: &CreateRequest| {
        let previous = request.previous_response_id.as_ref()?;
        let id = tether_common::ResponseId::parse(previous)?;
        ctx.cache.get(&turn.tenant, previous).is_none().then(|| (previous.clone(), id.session_key().0))
    };
    if turn.body.len() <= INLINE_PREPARE_BYTES {
        let request = parse(ctx, turn)?;
        if let Some((previous, key)) = to_pull(ctx, turn, &request) {
            replication::pull(ctx, &turn.tenant, &previous, key).await;
        }
        return step(ctx, turn, request);
    }
    // A large body: parsed and prepared on the blocking pool, in one hand-off unless its
    // parent must be pulled from a peer first.
    let span = tracing::Span::current();
    let first = {
        let (ctx, turn, span) = (ctx.clone(), turn.clone(), span.clone());
        tokio::task::spawn_blocking(move || {
            span.in_scope(|| {
                let request = parse(&ctx, &turn)?;
                Ok::<_, WorkerError>(match to_pull(&ctx, &turn, &request) {
                    None => LargeBody::Prepared(step(&ctx, &turn, request)?),
                    Some(pull) => LargeBody::Pull(request, pull),
                })
            })
        })
        .await
        .expect("prepare does not panic")?
    };
    let (request, (previous, key)) = match first {
        LargeBody::Prepared(prepared) => return Ok(prepared),
        LargeBody::Pull(request, pull) => (request, pull),
    };
    replication::pull(ctx, &turn.tenant, &previous, key).await;
    let (ctx, turn) = (ctx.clone(), turn.clone());
    tokio::task::spawn_blocking(move || span.in_scope(|| step(&ctx, &turn, request)))
        .await
        .expect("prepare does not panic")
}

/// A large body after its first hand-off to the blocking pool.
enum LargeBody {
    Prepared(Prepared),
    /// Parsed; its parent (response id, session key) must be pulled from a peer first.
    Pull(CreateRequest, (String, u64)),
}

enum Outcome {
    Completed,
    Incomplete,
    Failed,
    Cancelled,
    Closed,
}

/// The response a turn continues (its worker went away mid-response; see `Resume`), or a new
/// one: its id and creation time.
/// A resume naming a response of another session is ignored (the turn starts afresh).
fn response_identity<'a>(turn: &'a TurnRequest, prepared: &Prepared) -> (ResponseId, u64, Option<&'a Resume>) {
    if let Some(resume) = &turn.resume
        && let Some(id) = ResponseId::parse(&resume.response_id)
        && id.session_key() == prepared.session
    {
        metrics::counter!(m::TURNS_RESUMED).increment(1);
        return (id, resume.created_at, Some(resume));
    }
    (ResponseId::new(prepared.session), now_unix(), None)
}

async fn execute(ctx: &Arc<WorkerContext>, turn: &TurnRequest, prepared: Prepared, emitter: &mut Emitter) -> Outcome {
    let started = tether_common::pause::mark();
    let (id, created_at, resumed) = response_identity(turn, &prepared);
    // In flight from here until this function returns (the guard leaves on every path).
    let registration = ctx.in_flight.register(&turn.tenant, id.as_str());
    let parent_id = prepared.parent.as_ref().map(|parent| parent.id.clone());
    let template = ResponseTemplate::new(id.as_str(), created_at, &prepared.request, parent_id.as_deref());
    if emitter.streams() {
        // Serialized once for both events.
        let in_progress = to_raw(&template.snapshot("in_progress", |_| {}));
        let fields = ResponseField { response: &in_progress };
        if emitter.emit("response.created", &fields).await.is_err()
            || emitter.emit("response.in_progress", &fields).await.is_err()
        {
            return Outcome::Closed;
        }
    }

    let mut builder = OutputBuilder::new(id.as_str());
    let prefill_only = !prepared.request.generate;
    let cancel = registration.cancelled();
    let span = tracing::info_span!(
        "worker.infer",
        prefill_only,
        new_tokens = prepared.new_tokens.len(),
        resumed = resumed.map_or(0, |r| r.completion_ids.len())
    );
    let generation =
        infer::generate(ctx, &prepared, resumed, prefill_only, emitter, &mut builder, cancel).instrument(span).await;
    let (finished, completion, shard, cancelled) = match generation {
        Ok(Generation::Finished { finished, completion, shard }) => (finished, completion, shard, false),
        // Stored and continued like an incomplete response: the shard kept nothing of the
        // turn, so the next turn's claimed prefix misses once and the full prompt is resent.
        Ok(Generation::Cancelled { completion }) => (Default::default(), completion, String::new(), true),
        Ok(Generation::Closed) => return Outcome::Closed,
        Err(error) if prefill_only => {
            // A warmup that could not prefill still prepared the state: the next turn
            // resends the full prompt to whichever shard serves it.
            tracing::debug!(%error, "warmup prefill failed");
            (Default::default(), Vec::new(), String::new(), false)
        }
        Err(error) => return fail(emitter, &template, &mut builder, &error, &registration).await,
    };

    let incomplete = finished.reason == FinishReason::Length as i32;
    let status = match (cancelled, incomplete) {
        (true, _) => "cancelled",
        (false, true) => "incomplete",
        (false, false) => "completed",
    };
    let items_status = if status == "completed" { "completed" } else { "incomplete" };
    if builder.finish(emitter, items_status).await.is_err() {
        return Outcome::Closed;
    }
    if builder.malformed_call() {
        // The model opened a call it did not write out: the turn produced no usable answer.
        return fail(emitter, &template, &mut builder, &WorkerError::MalformedToolCall, &registration).await;
    }
    let shard_usage = finished.usage.unwrap_or_default();
    let timings = finished.timings.unwrap_or_default();
    if !completion.is_empty() {
        emitter.engine_ttft(std::time::Duration::from_micros(timings.queue_us + timings.prefill_us));
    }
    // A resumed generation's prompt held the response's earlier output: count it as output.
    let resumed_len = resumed.map_or(0, |resume| resume.completion_ids.len() as u32);
    let prompt_tokens = match shard_usage.prompt_tokens.saturating_sub(resumed_len) {
        0 => prepared_prompt_len(&prepared),
        shard => shard,
    };
    let cached_tokens = shard_usage.cached_tokens.min(prompt_tokens);
    let response = template.snapshot(status, |object| {
        if !cancelled {
            object.insert("completed_at".into(), json!(now_unix()));
        }
        object.insert("output".into(), Value::Array(std::mem::take(&mut builder.output)));
        object.insert("usage".into(), usage(prompt_tokens, cached_tokens, completion.len() as u32));
        if incomplete {
            object.insert("incomplete_details".into(), json!({"reason": "max_output_tokens"}));
        }
        object.insert(
            "x_tether".into(),
            json!({
                "worker": ctx.id, "shard": shard,
                "engine_us": timings.prefill_us + timings.decode_us,
                "queue_us": timings.queue_us, "prefill_us": timings.prefill_us, "decode_us": timings.decode_us,
                "trace_id": tether_common::trace::trace_id(),
            }),
        );
    });

    if tether_common::pause::paused_since(started) {
        // This process was stopped during the turn: its edge has continued the response on
        // another worker, whose copy is the one the client saw. Store and send nothing.
        tracing::warn!(response = %id, "this worker was stopped during the turn; its late result is dropped");
        metrics::counter!(m::TURNS_DROPPED_AFTER_PAUSE).increment(1);
        return Outcome::Closed;
    }
    // Serialized once: the terminal event and the stored copy are the same bytes.
    let json = to_raw(&response);
    let response = Arc::new(response);
    // 7. Commit (and replicate, in sync mode) before the terminal event: a client that saw
    // `completed` can continue, even after this worker crashes.
    if let Some(state) = commit(ctx, turn, &prepared, &id, builder, completion, &json) {
        match ctx.replication {
            ReplicationMode::Sync => replication::replicate(ctx, &state).await,
            ReplicationMode::Async => {
                let ctx = ctx.clone();
                tokio::spawn(async move { replication::replicate(&ctx, &state).await }.in_current_span());
            }
            ReplicationMode::Off => {}
        }
    }
    registration.finish(response);
    // A cancelled response ends with `response.incomplete` (the SDK's stream helpers and
    // `connect()` accumulator know three terminal events; none is named for cancelling), its
    // `response.status` saying "cancelled".
    let terminal = if status == "completed" { "response.completed" } else { "response.incomplete" };
    if emitter.terminal(terminal, &json, 200).await.is_err() {
        return Outcome::Closed;
    }
    match status {
        "cancelled" => Outcome::Cancelled,
        "incomplete" => Outcome::Incomplete,
        _ => Outcome::Completed,
    }
}

fn prepared_prompt_len(prepared: &Prepared) -> u32 {
    prepared.claimed_prefix().0 + prepared.new_tokens.len() as u32
}

/// Ends a started response with `response.failed` (or a 500 for non-streaming HTTP).
async fn fail(
    emitter: &mut Emitter,
    template: &ResponseTemplate,
    builder: &mut OutputBuilder,
    error: &WorkerError,
    registration: &Registration,
) -> Outcome {
    tracing::warn!(%error, class = error.class().as_label(), "turn failed");
    if builder.finish(emitter, "incomplete").await.is_err() {
        return Outcome::Closed;
    }
    let api = error.api_error();
    let response = template.snapshot("failed", |object| {
        object.insert("output".into(), Value::Array(std::mem::take(&mut builder.output)));
        object.insert("error".into(), json!({"code": "server_error", "message": api.message}));
    });
    let status = if api.status >= 500 { api.status } else { 500 };
    let json = to_raw(&response);
    registration.finish(Arc::new(response));
    let _ = emitter.terminal("response.failed", &json, status).await;
    Outcome::Failed
}

/// A Response object serialized (compact, as every event and stored copy writes it).
fn to_raw(response: &Value) -> Box<RawValue> {
    serde_json::value::to_raw_value(response).expect("responses serialize")
}

fn commit(
    ctx: &WorkerContext,
    turn: &TurnRequest,
    prepared: &Prepared,
    id: &ResponseId,
    builder: OutputBuilder,
    completion: Vec<u32>,
    response: &RawValue,
) -> Option<Arc<ResponseState>> {
    let request = &prepared.request;
    if !request.store && turn.connection == 0 {
        // store=false over HTTP can never be continued: keep nothing.
        return None;
    }
    // The tokens the shard now holds: the prompt plus what it generated.
    let mut appended = prepared.new_tokens.clone();
    appended.extend_from_slice(&completion);
    let own_tokens = appended.len() as u32;
    let (tokens, prefix_hash) = match (&prepared.parent, prepared.full) {
        (Some(parent), false) => {
            let mut hash = parent.prefix_hash;
            hash.extend(&appended);
            (parent.tokens.with(appended), hash)
        }
        _ => (Segments::default().with(appended.clone()), PrefixHash::of(&appended)),
    };
    let items = prepared.parent.as_ref().map(|parent| parent.items.clone()).unwrap_or_default();
    let verdicts = prepared.parent.as_ref().map(|parent| parent.verdicts.clone()).unwrap_or_default();
    let mut new_items = request.input.clone();
    new_items.extend(builder.items);
    let own_items = new_items.len() as u32;
    let response_json: Arc<[u8]> =
        if request.store { Arc::from(response.get().as_bytes()) } else { Arc::from(&[][..]) };
    let state = ResponseState {
        id: id.as_str().to_owned(),
        parent: prepared.parent.as_ref().map(|parent| parent.id.clone()),
        own_items,
        own_tokens,
        tokens_rebuilt: prepared.full,
        tenant: Arc::from(turn.tenant.as_str()),
        session: prepared.session,
        store: request.store,
        connection: turn.connection,
        model: request.model.clone(),
        header_key: prepared.header_key,
        items: items.with(new_items),
        tokens,
        prefix_hash,
        open_assistant: prepared.open_assistant,
        tool_outputs_seen: prepared.tool_outputs_seen,
        verdicts: verdicts.with(vec![prepared.verdict.clone()]),
        response_json,
        created: Instant::now(),
    };
    let state = Arc::new(state);
    ctx.cache.insert(state.clone());
    Some(state)
}
