//! Step 5 of the pipeline: one `Generate` stream to the session's shard.
//!
//! The worker claims the prefix it believes the shard holds; on a cache miss it resends the
//! whole prompt once. A shard that cannot be reached before it produced anything is replaced
//! by the next shard on the ring (whose cache is then rebuilt from the full prompt).

use std::collections::HashMap;

use tether_proto::shard::v1::generate_chunk::Kind;
use tether_proto::shard::v1::{
    FinishReason, Finished, GenerateRequest, OutputFormat, OutputFormatKind, Sampling, ToolChoice, ToolSpec,
};
use tether_proto::worker::v1::Resume;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

use super::prepare::Prepared;
use crate::api::events::{Closed, Emitter};
use crate::api::request::ToolChoice as RequestToolChoice;
use crate::api::text_format::TextFormat;
use crate::context::WorkerContext;
use crate::error::WorkerError;
use crate::metrics as m;
use crate::pipeline::output::OutputBuilder;
use crate::session::held::Claim;

/// How the generation ended.
pub enum Generation {
    Finished {
        finished: Finished,
        completion: Vec<u32>,
        shard: String,
    },
    /// The client went away.
    Closed,
    /// The response was cancelled: the shard stream was dropped (so the shard stops decoding
    /// and keeps nothing of the turn) after `completion`.
    Cancelled {
        completion: Vec<u32>,
    },
}

/// The shard request of a turn. A stateless turn's `claim` (what the shard holds of its
/// session, [`crate::session::held`]) stands for the prompt's first tokens, which are not sent.
pub fn generate_request(prepared: &Prepared, prefill_only: bool, claim: Option<Claim>) -> GenerateRequest {
    let request = &prepared.request;
    let (prefix_len, prefix_hash, tokens, full) = match claim {
        Some(claim) => (claim.len, claim.hash, prepared.new_tokens[claim.len as usize..].to_vec(), false),
        None => {
            let (prefix_len, prefix_hash) = prepared.claimed_prefix();
            (prefix_len, prefix_hash, prepared.new_tokens.clone(), prepared.full)
        }
    };
    let tools = (!request.tools.is_empty()).then(|| {
        let (choice, function) = match &request.tool_choice {
            RequestToolChoice::Auto => (ToolChoice::Auto, String::new()),
            RequestToolChoice::None => (ToolChoice::None, String::new()),
            RequestToolChoice::Required => (ToolChoice::Required, String::new()),
            RequestToolChoice::Function(name) => (ToolChoice::Function, name.clone()),
        };
        ToolSpec {
            tools_json: serde_json::Value::Array(request.tools.clone()).to_string(),
            choice: choice as i32,
            function,
            tool_outputs_seen: prepared.tool_outputs_seen,
        }
    });
    // Engine hints come from the request's metadata keys the engine knows; never user text.
    let hints: HashMap<String, String> = request
        .metadata
        .iter()
        .filter(|(key, _)| key.starts_with("tether_"))
        .filter_map(|(key, value)| value.as_str().map(|v| (key.clone(), v.to_owned())))
        .collect();
    GenerateRequest {
        session: prepared.session.0,
        model: request.model.clone(),
        prefix_len,
        prefix_hash: prefix_hash.value(),
        tokens,
        full,
        sampling: Some(Sampling {
            temperature: request.temperature.map(|t| t as f32),
            top_p: request.top_p.map(|p| p as f32),
            max_output_tokens: request.max_output_tokens.unwrap_or(0),
        }),
        tools,
        hints,
        prefill_only,
        output_format: output_format(&request.text_format),
        resume_tokens: 0,
        cache_scope: prepared.cache_scope,
    }
}

/// The shard's form of `text.format` (`None` for plain text).
fn output_format(format: &TextFormat) -> Option<OutputFormat> {
    match format {
        TextFormat::Text => None,
        TextFormat::JsonObject => {
            Some(OutputFormat { kind: OutputFormatKind::JsonObject as i32, ..Default::default() })
        }
        TextFormat::JsonSchema { name, schema, strict } => Some(OutputFormat {
            kind: OutputFormatKind::JsonSchema as i32,
            schema_json: schema.to_string(),
            name: name.clone(),
            strict: *strict,
        }),
    }
}

/// Runs the generation, streaming output events through `builder`. Errors after the first
/// output event are final (the caller ends the response with `response.failed`). A fired
/// `cancel` ends it at once with what was generated so far.
///
/// A `resumed` response (its first worker went away mid-response) first replays the output it
/// already had through `builder`, then asks the shard to continue the generation after it. A
/// shard that goes away mid-generation is replaced the same way: the next shard continues after
/// the tokens already produced, so the client sees one uninterrupted answer.
pub async fn generate(
    ctx: &WorkerContext,
    prepared: &Prepared,
    resumed: Option<&Resume>,
    prefill_only: bool,
    emitter: &mut Emitter,
    builder: &mut OutputBuilder,
    cancel: &CancellationToken,
) -> Result<Generation, WorkerError> {
    let candidates = ctx.shards.candidates(prepared.session.0);
    if candidates.is_empty() {
        return Err(WorkerError::NoShard);
    }
    let (done, done_text) = resumed.map_or((&[][..], ""), |r| (&r.completion_ids[..], r.completion_text.as_str()));
    if builder.push(emitter, done_text).await == Err(Closed) {
        return Ok(Generation::Closed);
    }
    // A stateless turn resends its history: claim what the shard holds of it.
    let claim = match prepared.parent {
        None => ctx.held.claim(prepared.cache_scope, prepared.session.0, &prepared.new_tokens),
        Some(_) => None,
    };
    if let Some(claim) = claim {
        metrics::counter!(m::STATELESS_CLAIMED_TOKENS).increment(u64::from(claim.len));
    }
    let mut request = generate_request(prepared, prefill_only, claim);
    let budget = request.sampling.as_ref().map_or(0, |sampling| sampling.max_output_tokens);
    // The output so far (continued after), and whether the shard needs the whole prompt.
    let mut so_far = done.to_vec();
    let mut full = request.full;
    let mut last_error = WorkerError::NoShard;
    for (attempt, (shard_id, shard)) in candidates.iter().enumerate() {
        if attempt > 0 {
            // Another shard holds nothing of this session: send everything.
            full = true;
            metrics::counter!(m::SHARD_FAILOVERS).increment(1);
        }
        let mut resent = false;
        'resend: loop {
            if !continue_after(&mut request, prepared, &so_far, full, budget) {
                // The output reached its limit just as its worker or shard went away.
                let finished = Finished { reason: FinishReason::Length as i32, ..Default::default() };
                return Ok(Generation::Finished { finished, completion: so_far, shard: String::new() });
            }
            let mut stream = match shard.generate(request.clone()).await {
                Ok(stream) => stream,
                Err(status) => {
                    tracing::warn!(shard = %shard_id, code = ?status.code(), "shard call failed");
                    last_error = WorkerError::Shard(status);
                    if last_error.class().is_retryable() {
                        ctx.shards.eject(shard_id);
                        break 'resend;
                    }
                    return Err(last_error);
                }
            };
            let mut completion = so_far.clone();
            loop {
                let next = tokio::select! {
                    biased;
                    () = cancel.cancelled() => return Ok(Generation::Cancelled { completion }),
                    next = stream.next() => next,
                };
                let chunk = match next {
                    Some(Ok(chunk)) => chunk,
                    Some(Err(status)) => {
                        tracing::warn!(shard = %shard_id, code = ?status.code(), produced = completion.len() - so_far.len(), "shard stream broke");
                        last_error = WorkerError::Shard(status);
                        if !last_error.class().is_retryable() {
                            return Err(last_error);
                        }
                        ctx.shards.eject(shard_id);
                        so_far = completion;
                        break 'resend;
                    }
                    None => {
                        last_error =
                            WorkerError::Shard(tonic::Status::unavailable("shard stream ended without finishing"));
                        so_far = completion;
                        break 'resend;
                    }
                };
                match chunk.kind {
                    Some(Kind::CacheMiss(miss)) if !resent => {
                        tracing::debug!(shard = %shard_id, held = miss.held_len, "shard cache miss; resending the full prompt");
                        metrics::counter!(m::SHARD_RESENDS).increment(1);
                        full = true;
                        resent = true;
                        continue 'resend;
                    }
                    Some(Kind::CacheMiss(_)) => {
                        return Err(WorkerError::Shard(tonic::Status::internal("shard missed a full prompt")));
                    }
                    Some(Kind::Tokens(tokens)) => {
                        completion.extend_from_slice(&tokens.ids);
                        emitter.progress(&tokens.ids, &tokens.text);
                        if builder.push(emitter, &tokens.text).await == Err(Closed) {
                            return Ok(Generation::Closed);
                        }
                    }
                    Some(Kind::Finished(finished)) => {
                        if prepared.parent.is_none() {
                            let claim = if full { None } else { claim };
                            let (scope, session) = (prepared.cache_scope, prepared.session.0);
                            ctx.held.remember(scope, session, claim, &prepared.new_tokens, &completion);
                        }
                        return Ok(Generation::Finished { finished, completion, shard: shard_id.clone() });
                    }
                    None => {}
                }
            }
        }
    }
    Err(last_error)
}

/// Points `request` at the generation after `so_far` (this response's output already
/// produced): the prompt (whole when `full`, else after the claimed prefix) followed by it, and
/// the rest of the `budget` (0: none). False when the budget is spent.
fn continue_after(request: &mut GenerateRequest, prepared: &Prepared, so_far: &[u32], full: bool, budget: u32) -> bool {
    let done = so_far.len() as u32;
    if budget > 0 && done >= budget {
        return false;
    }
    if full && !request.full {
        request.full = true;
        request.prefix_len = 0;
        request.prefix_hash = 0;
        request.tokens = prepared.full_prompt();
        request.resume_tokens = 0;
    }
    // The tokens end with the previous attempt's output so far: replace it.
    let prompt = request.tokens.len() - request.resume_tokens as usize;
    request.tokens.truncate(prompt);
    request.tokens.extend_from_slice(so_far);
    request.resume_tokens = done;
    if let Some(sampling) = request.sampling.as_mut()
        && budget > 0
    {
        sampling.max_output_tokens = budget - done;
    }
    true
}
