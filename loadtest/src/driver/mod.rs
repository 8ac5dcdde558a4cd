//! Drives one simulated agent through its workflows. The tool loop (model call → tool call →
//! simulated tool latency → `function_call_output` → …, then a final answer) lives here;
//! each mode's module only knows how to send one model call and read its reply.

mod direct;
mod events;
mod http;
mod request;
mod ws;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::Value;
use tiktoken_rs::CoreBPE;

pub use self::events::{ModelAction, TurnReply};
use crate::config::{Config, Mode};
use crate::scenario::WorkflowPlan;
use crate::stats::{Recorder, TurnError};

/// What every agent of a mode shares.
pub struct ModeContext {
    pub mode: Mode,
    pub config: Config,
    /// No connection pool: `http-*` modes open a new connection per request.
    pub http: reqwest::Client,
    /// Shard addresses (`direct` only).
    pub shards: Vec<String>,
    /// o200k_base (`direct` only).
    pub bpe: Option<Arc<CoreBPE>>,
}

impl ModeContext {
    pub async fn new(config: &Config, mode: Mode) -> anyhow::Result<Arc<Self>> {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(10))
            .build()
            .context("building the HTTP client")?;
        let (shards, bpe) = if mode == Mode::Direct {
            let shards = direct::discover_shards(&http, &config.target).await?;
            let bpe = tokio::task::spawn_blocking(tiktoken_rs::o200k_base).await??;
            (shards, Some(Arc::new(bpe)))
        } else {
            (Vec::new(), None)
        };
        Ok(Arc::new(ModeContext { mode, config: config.clone(), http, shards, bpe }))
    }
}

/// The conversation of one workflow, as the client sees it.
pub struct Conversation<'a> {
    pub plan: &'a WorkflowPlan,
    /// `prompt_cache_key` / direct session name, unique per mode and workflow.
    pub key: String,
    pub previous_response_id: Option<String>,
    /// The items this turn adds.
    pub new_items: Vec<Value>,
    /// Every item so far, outputs included (`http-full` resends it all).
    pub history: Vec<Value>,
    pub tool_outputs_seen: u32,
}

impl<'a> Conversation<'a> {
    fn new(plan: &'a WorkflowPlan, mode: Mode, seed: u64) -> Self {
        let first = request::user_message(&plan.user_text);
        Conversation {
            plan,
            key: plan.conversation_key(mode.name(), seed),
            previous_response_id: None,
            new_items: vec![first.clone()],
            history: vec![first],
            tool_outputs_seen: 0,
        }
    }

    /// Appends the model's output and the answer to its call `call_id`.
    fn advance(&mut self, reply: TurnReply, call_id: String) {
        let output = &self.plan.tool_outputs[self.tool_outputs_seen as usize];
        let item = request::function_call_output(&call_id, output);
        self.history.extend(reply.output);
        self.history.push(item.clone());
        self.new_items = vec![item];
        self.previous_response_id = reply.response_id;
        self.tool_outputs_seen += 1;
    }
}

/// One simulated agent: a connection (or none) plus per-workflow state.
pub enum Agent {
    Ws(ws::WsAgent),
    Http(http::HttpAgent),
    Direct(direct::DirectAgent),
}

impl Agent {
    pub fn new(ctx: &Arc<ModeContext>) -> Self {
        match ctx.mode {
            Mode::Ws => Agent::Ws(ws::WsAgent::new(ctx.clone())),
            Mode::Direct => Agent::Direct(direct::DirectAgent::new(ctx.clone())),
            Mode::HttpChained | Mode::HttpFull | Mode::HttpFullKeyless | Mode::All => {
                Agent::Http(http::HttpAgent::new(ctx.clone()))
            }
        }
    }

    async fn begin(&mut self, conv: &Conversation<'_>) -> Result<(), TurnError> {
        match self {
            Agent::Ws(agent) => agent.ensure_connected().await,
            Agent::Http(_) => Ok(()),
            Agent::Direct(agent) => agent.begin(conv).await,
        }
    }

    async fn turn(&mut self, conv: &Conversation<'_>) -> Result<TurnReply, TurnError> {
        match self {
            Agent::Ws(agent) => agent.turn(conv).await,
            Agent::Http(agent) => agent.turn(conv).await,
            Agent::Direct(agent) => agent.turn(conv).await,
        }
    }

    /// Ends the agent: closes a WebSocket cleanly.
    pub async fn close(&mut self) {
        if let Agent::Ws(agent) = self {
            agent.close().await;
        }
    }

    /// Forgets connection state that a failed or abandoned turn may have left half-read.
    fn reset(&mut self) {
        if let Agent::Ws(agent) = self {
            agent.disconnect();
        }
    }
}

/// Runs one workflow to its final answer; records every turn and the workflow. Returns
/// whether it succeeded.
pub async fn run_workflow(agent: &mut Agent, ctx: &ModeContext, plan: &WorkflowPlan, recorder: &Recorder) -> bool {
    let started = Instant::now();
    let timeout = ctx.config.request_timeout;
    let mut conv = Conversation::new(plan, ctx.mode, ctx.config.workload.seed);
    let fail = |agent: &mut Agent, error: TurnError| {
        agent.reset();
        let mut stats = recorder.lock();
        stats.record_error(&error);
        stats.record_workflow(started.elapsed(), false);
        false
    };
    match tokio::time::timeout(timeout, agent.begin(&conv)).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => return fail(agent, error),
        Err(_) => {
            return fail(agent, TurnError::new(crate::stats::ErrorClass::Timeout, "connect"));
        }
    }
    // One model call per tool turn plus the answer; the bound stops a model that never answers.
    for _ in 0..=plan.turns() {
        let reply = match tokio::time::timeout(timeout, agent.turn(&conv)).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(error)) => return fail(agent, error),
            Err(_) => {
                return fail(agent, TurnError::new(crate::stats::ErrorClass::Timeout, "model call"));
            }
        };
        recorder.lock().record_turn(&reply.sample);
        let seen = conv.tool_outputs_seen;
        match reply.action.clone() {
            ModelAction::ToolCall { call_id } if seen < plan.turns() => {
                tokio::time::sleep(plan.tool_latencies[seen as usize]).await;
                conv.advance(reply, call_id);
            }
            ModelAction::Answer if seen == plan.turns() => {
                recorder.lock().record_workflow(started.elapsed(), true);
                return true;
            }
            ModelAction::Answer => {
                let detail = format!("final answer after {seen} of {} tool calls", plan.turns());
                return fail(agent, TurnError::protocol("early_answer", detail));
            }
            ModelAction::ToolCall { .. } => {
                return fail(agent, TurnError::protocol("extra_tool_call", "tool call after the last turn"));
            }
        }
    }
    fail(agent, TurnError::protocol("extra_tool_call", "no final answer"))
}
