//! Steps 1–6 of the per-turn pipeline: resolve the parent, validate the new request against
//! it, safety-check only the new input, render only the new items, fit the context window and
//! charge the tenant's prefill budget.

use std::sync::Arc;

use tether_common::SessionKey;
use tether_common::tokens::PrefixHash;
use tether_proto::worker::v1::TurnRequest;

use crate::api::items::Item;
use crate::api::request::CreateRequest;
use crate::context::WorkerContext;
use crate::error::WorkerError;
use crate::metrics as m;
use crate::session::ResponseState;
use crate::session::state::Verdict;

/// A validated turn, ready for the shard.
pub struct Prepared {
    pub request: CreateRequest,
    pub parent: Option<Arc<ResponseState>>,
    pub session: SessionKey,
    pub header_key: u64,
    /// Tokens to append after the parent's (or the whole prompt when `full`).
    pub new_tokens: Vec<u32>,
    /// The prompt was rendered from scratch (no parent, or the header changed).
    pub full: bool,
    /// Whether the prompt ends inside an open assistant block (generation continues it).
    pub open_assistant: bool,
    pub tool_outputs_seen: u32,
    pub verdict: Verdict,
    /// The tenant's scope in the shard's shared prefix index ([`tether_common::ids::cache_scope`]).
    pub cache_scope: u64,
}

impl Prepared {
    /// The length and hash of the prefix the shard should already hold.
    pub fn claimed_prefix(&self) -> (u32, PrefixHash) {
        match (&self.parent, self.full) {
            (Some(parent), false) => (parent.tokens.len() as u32, parent.prefix_hash),
            _ => (0, PrefixHash::default()),
        }
    }

    /// The whole prompt, for a resend after a shard cache miss.
    pub fn full_prompt(&self) -> Vec<u32> {
        match (&self.parent, self.full) {
            (Some(parent), false) => {
                let mut all = parent.tokens.to_vec();
                all.extend_from_slice(&self.new_tokens);
                all
            }
            _ => self.new_tokens.clone(),
        }
    }
}

/// Prepares a turn to run: [`plan`], then the charge to the tenant's prefill budget (step 6).
pub fn prepare(ctx: &WorkerContext, turn: &TurnRequest, request: CreateRequest) -> Result<Prepared, WorkerError> {
    let started = std::time::Instant::now();
    let prepared = plan(ctx, turn, request)?;
    charge(ctx, &turn.tenant, &prepared)?;
    metrics::histogram!(m::PREPARE_SECONDS).record(started.elapsed().as_secs_f64());
    Ok(prepared)
}

/// Steps 1–5: the prompt a turn would send, validated exactly as a turn validates it, without
/// charging anything (`POST /v1/responses/input_tokens` counts it).
pub fn plan(ctx: &WorkerContext, turn: &TurnRequest, request: CreateRequest) -> Result<Prepared, WorkerError> {
    // 1. Resolve state: O(1) in the session cache. A foreign tenant's id, an evicted one
    // and a store=false one from another connection all look exactly like unknown ids.
    let stage = tracing::info_span!("worker.resolve", chained = request.previous_response_id.is_some()).entered();
    let parent = match &request.previous_response_id {
        None => None,
        Some(id) => {
            let state = ctx
                .cache
                .get(&turn.tenant, id)
                .filter(|state| state.store || (turn.connection != 0 && state.connection == turn.connection))
                .ok_or_else(|| WorkerError::PreviousResponseNotFound(id.clone()))?;
            Some(state)
        }
    };

    drop(stage);

    // 2. Validate only what is new against the cached config.
    let stage = tracing::info_span!("worker.validate").entered();
    match ctx.shards.serves(&request.model) {
        Some(false) => return Err(WorkerError::ModelNotFound(request.model.clone())),
        None if ctx.shards.is_empty() => return Err(WorkerError::NoShard),
        _ => {}
    }
    // A JSON `text.format` needs an engine that can constrain its output (the sim can; the
    // llama engine cannot): refuse it up front rather than answer with unconstrained text.
    if request.text_format.is_json() && ctx.shards.structured_outputs(&request.model) == Some(false) {
        return Err(WorkerError::invalid(
            "text.format",
            format!(
                "The model '{}' cannot produce structured outputs on this server: its engine cannot \
                 constrain output to JSON. Use 'text.format' of type 'text'.",
                request.model
            ),
        ));
    }
    if parent.is_none() && request.input.is_empty() && request.generate {
        return Err(WorkerError::invalid("input", "'input' is required when there is no 'previous_response_id'."));
    }

    drop(stage);

    // 3. Safety-check only the new input.
    let stage =
        tracing::info_span!("worker.safety", items = request.input.len(), bytes = tracing::field::Empty).entered();
    let mut checked_bytes = 0u64;
    for item in &request.input {
        let text = item.checked_text();
        checked_bytes += text.len() as u64;
        if let Some(category) = ctx.classifier.classify(text) {
            metrics::counter!(m::SAFETY_FLAGGED).increment(1);
            return Err(WorkerError::Flagged(category.to_owned()));
        }
    }
    metrics::counter!(m::SAFETY_CHECKED_BYTES).increment(checked_bytes);
    stage.record("bytes", checked_bytes);
    drop(stage);
    let verdict =
        Verdict { classifier: ctx.classifier.name().into(), items: request.input.len() as u32, bytes: checked_bytes };

    // 4. Render only the new items, unless the header changed (and, below, fit the window
    // and charge the prefill budget: all part of `worker.render`).
    let stage =
        tracing::info_span!("worker.render", full = tracing::field::Empty, tokens = tracing::field::Empty).entered();
    let renderer = ctx.renderer.for_model(&request.model);
    let header_key = renderer.header_key_for(request.instructions.as_deref(), &request.tools);
    let mut new_tokens = Vec::new();
    let incremental = parent.as_ref().filter(|parent| parent.header_key == header_key);
    let (full, in_assistant) = match incremental {
        Some(parent) => (false, renderer.items(&request.input, parent.open_assistant, &mut new_tokens)),
        None => {
            renderer.header(request.instructions.as_deref(), &request.tools, &mut new_tokens);
            let history = parent.iter().flat_map(|parent| parent.items.iter());
            (true, renderer.items(history.chain(request.input.iter()), false, &mut new_tokens))
        }
    };
    let mut open_assistant = if request.generate {
        renderer.generation_prompt(in_assistant, &mut new_tokens);
        true
    } else {
        in_assistant
    };
    let mut full = full;

    // 5. Fit the model's context window before any engine work: the prompt plus the output
    // it asks for. `truncation: "auto"` drops whole items from the front of the chain
    // (keeping the instructions and tools); the default refuses. The chain's items stay as
    // they are (retrieval and a later full render see them all); only the prompt is cut.
    if let Some(window) = ctx.shards.context_window(&request.model) {
        let reserve = if request.generate { request.max_output_tokens.unwrap_or(1) } else { 0 };
        let fits = |prompt: usize| prompt as u64 + u64::from(reserve) <= u64::from(window);
        let prompt_len = match (&parent, full) {
            (Some(parent), false) => parent.tokens.len(),
            _ => 0,
        } + new_tokens.len();
        if !fits(prompt_len) {
            let exceeded = || {
                WorkerError::invalid_with_code(
                    "input",
                    format!(
                        "Your input exceeds the context window of this model: the prompt has {prompt_len} tokens \
                         and {reserve} output tokens were asked for; the window holds {window}. Please adjust \
                         your input and try again, or set 'truncation' to 'auto'."
                    ),
                    "context_length_exceeded",
                )
            };
            if !request.truncation_auto {
                return Err(exceeded());
            }
            let chain: Vec<&Item> =
                parent.iter().flat_map(|parent| parent.items.iter()).chain(request.input.iter()).collect();
            let render = |skip: usize| {
                let mut tokens = Vec::new();
                renderer.header(request.instructions.as_deref(), &request.tools, &mut tokens);
                let in_assistant = renderer.items(chain[skip..].iter().copied(), false, &mut tokens);
                let open = if request.generate {
                    renderer.generation_prompt(in_assistant, &mut tokens);
                    true
                } else {
                    in_assistant
                };
                (tokens, open)
            };
            // The fewest items to drop (keeping at least the last one): dropping more never
            // makes the prompt longer, so a binary search renders O(log n) times.
            let (mut low, mut high) = (0usize, chain.len().saturating_sub(1));
            if !fits(render(high).0.len()) {
                return Err(exceeded());
            }
            while low < high {
                let middle = (low + high) / 2;
                if fits(render(middle).0.len()) { high = middle } else { low = middle + 1 }
            }
            let (tokens, open) = render(low);
            metrics::counter!(m::TRUNCATED_ITEMS).increment(low as u64);
            tracing::debug!(dropped = low, tokens = tokens.len(), window, "prompt truncated to the context window");
            new_tokens = tokens;
            open_assistant = open;
            full = true;
        }
    }
    stage.record("full", full).record("tokens", new_tokens.len());
    drop(stage);
    let new_outputs =
        request.input.iter().filter(|item| matches!(item, Item::FunctionCallOutput { .. })).count() as u32;
    let tool_outputs_seen = match (&parent, full) {
        (Some(parent), _) => parent.tool_outputs_seen + new_outputs,
        (None, _) => new_outputs,
    };
    let session = parent.as_ref().map_or(SessionKey(turn.session), |parent| parent.session);
    let cache_scope = tether_common::ids::cache_scope(&turn.tenant);
    Ok(Prepared {
        request,
        parent,
        session,
        header_key,
        new_tokens,
        full,
        open_assistant,
        tool_outputs_seen,
        verdict,
        cache_scope,
    })
}

/// 6. The tenant's prefill budget: what this turn makes the shard prefill.
fn charge(ctx: &WorkerContext, tenant: &str, prepared: &Prepared) -> Result<(), WorkerError> {
    let uncached = prepared.new_tokens.len() as u32;
    if let Err(wait) = ctx.prefill_budget.charge(tenant, uncached, std::time::Instant::now()) {
        metrics::counter!(m::PREFILL_BUDGET_REFUSED).increment(1);
        return Err(WorkerError::RateLimited(format!(
            "Rate limit reached for prompt tokens: this tenant's prefill budget is spent. Try again in {} ms.",
            wait.as_millis().max(1)
        )));
    }
    metrics::counter!(m::RENDERED_TOKENS, "path" => if prepared.full { "full" } else { "incremental" })
        .increment(prepared.new_tokens.len() as u64);
    Ok(())
}
