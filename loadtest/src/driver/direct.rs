//! `direct` mode: gRPC `tether.shard.v1.Shard/Generate` straight to a shard, with no edge and
//! no worker: the floor the other modes are compared with. The agent renders and tokenizes
//! its conversation itself (o200k_base, before the turn's clock starts) and, like a worker,
//! sends only the new tokens after the prefix the shard holds (prompt + generated tokens),
//! naming that prefix by length and FNV-1a 64 hash; on a cache miss it resends everything once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use prost::Message as _;
use serde_json::Value;
use tether_proto::shard::v1::generate_chunk::Kind;
use tether_proto::shard::v1::shard_client::ShardClient;
use tether_proto::shard::v1::{GenerateRequest, Sampling, ToolChoice, ToolSpec};
use tiktoken_rs::CoreBPE;
use tonic::transport::{Channel, Endpoint};

use super::events::{ModelAction, TurnReply};
use super::{Conversation, ModeContext};
use crate::config::Target;
use crate::scenario::{HINT_OUTPUT_TOKENS, HINT_TOOL_CALLS, WorkflowPlan, tool_definition};
use crate::stats::{ErrorClass, TurnError, TurnSample};

/// Returns the shard addresses: `--shard`, or the `shards` of `GET {url}/v1/cluster`.
pub async fn discover_shards(http: &reqwest::Client, target: &Target) -> anyhow::Result<Vec<String>> {
    if let Some(shard) = &target.shard {
        return Ok(vec![shard.clone()]);
    }
    let url = format!("{}/v1/cluster", target.http_url);
    let cluster: Value = http
        .get(&url)
        .bearer_auth(&target.api_key)
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .with_context(|| format!("GET {url} (or pass --shard)"))?
        .json()
        .await
        .with_context(|| format!("GET {url}: not JSON"))?;
    let shards: Vec<String> = cluster["shards"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|shard| shard["addr"].as_str().map(|a| a.trim_end_matches('/').to_owned()))
        .collect();
    if shards.is_empty() {
        bail!("GET {url} lists no shards");
    }
    Ok(shards)
}

/// FNV-1a 64 over each token's u32 little-endian bytes (the shard's prefix hash).
#[derive(Clone, Copy)]
struct PrefixHash(u64);

impl PrefixHash {
    const fn new() -> Self {
        PrefixHash(0xcbf2_9ce4_8422_2325)
    }

    fn extend(&mut self, tokens: &[u32]) {
        for token in tokens {
            for byte in token.to_le_bytes() {
                self.0 ^= u64::from(byte);
                self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
    }
}

/// What one workflow's conversation looks like to the shard.
struct DirectSession {
    session: u64,
    shard: usize,
    /// Tokens the shard holds for the session: prompt and generated tokens so far.
    held: Vec<u32>,
    hash: PrefixHash,
    /// Pre-tokenized new input per turn: the user message, then each tool output.
    segments: Vec<Vec<u32>>,
}

pub struct DirectAgent {
    ctx: Arc<ModeContext>,
    clients: HashMap<usize, ShardClient<Channel>>,
    session: Option<DirectSession>,
}

impl DirectAgent {
    pub fn new(ctx: Arc<ModeContext>) -> Self {
        DirectAgent { ctx, clients: HashMap::new(), session: None }
    }

    /// Tokenizes the whole workflow up front and connects to its shard.
    pub async fn begin(&mut self, conv: &Conversation<'_>) -> Result<(), TurnError> {
        let mut key_hash = PrefixHash::new();
        key_hash.extend(&conv.key.bytes().map(u32::from).collect::<Vec<_>>());
        let session = key_hash.0;
        let shard = (session % self.ctx.shards.len() as u64) as usize;
        let bpe = self.ctx.bpe.clone().expect("direct mode loads the tokenizer");
        let plan = conv.plan.clone();
        let segments = tokio::task::spawn_blocking(move || render_segments(&bpe, &plan))
            .await
            .map_err(|e| TurnError::protocol("tokenize", e.to_string()))?;
        self.session = Some(DirectSession { session, shard, held: Vec::new(), hash: PrefixHash::new(), segments });
        if !self.clients.contains_key(&shard) {
            let client = connect(&self.ctx.shards[shard]).await?;
            self.clients.insert(shard, client);
        }
        Ok(())
    }

    pub async fn turn(&mut self, conv: &Conversation<'_>) -> Result<TurnReply, TurnError> {
        let state = self.session.as_mut().expect("begin() ran");
        let client = self.clients.get_mut(&state.shard).expect("begin() connected");
        let turn = conv.tool_outputs_seen;
        let new_tokens = state.segments[turn as usize].clone();
        let mut request = generate_request(&self.ctx, conv, state, new_tokens.clone());
        let mut bytes_sent = request.encoded_len() as u64;
        let sent_at = Instant::now();
        let mut resent = false;
        let mut stream = client.generate(request.clone()).await.map_err(grpc_error)?.into_inner();
        let (mut first, mut last) = (None::<Instant>, None::<Instant>);
        let mut sample = TurnSample::default();
        let mut generated = Vec::new();
        let mut text = String::new();
        loop {
            let chunk = stream.message().await.map_err(grpc_error)?;
            let at = Instant::now();
            match chunk.and_then(|c| c.kind) {
                None => {
                    return Err(TurnError::protocol("grpc_stream_ended", "no finished chunk"));
                }
                Some(Kind::CacheMiss(_)) if resent => {
                    return Err(TurnError::protocol("cache_miss_twice", "miss on a full request"));
                }
                Some(Kind::CacheMiss(_)) => {
                    resent = true;
                    request.tokens = state.held.iter().copied().chain(new_tokens.iter().copied()).collect();
                    request.full = true;
                    request.prefix_len = 0;
                    request.prefix_hash = PrefixHash::new().0;
                    bytes_sent += request.encoded_len() as u64;
                    stream = client.generate(request.clone()).await.map_err(grpc_error)?.into_inner();
                }
                Some(Kind::Tokens(tokens)) => {
                    first.get_or_insert(at);
                    if let Some(previous) = last.replace(at) {
                        sample.inter_token.push(at - previous);
                    }
                    generated.extend(tokens.ids);
                    text.push_str(&tokens.text);
                }
                Some(Kind::Finished(finished)) => {
                    sample.total = at - sent_at;
                    sample.ttft = first.map(|t| t - sent_at);
                    sample.bytes_sent = bytes_sent;
                    if let Some(usage) = finished.usage {
                        sample.input_tokens = Some(usage.prompt_tokens.into());
                        sample.cached_tokens = Some(usage.cached_tokens.into());
                        sample.output_tokens = Some(usage.completion_tokens.into());
                    }
                    sample.engine =
                        finished.timings.map(|t| Duration::from_micros(t.queue_us + t.prefill_us + t.decode_us));
                    break;
                }
            }
        }
        for tokens in [&new_tokens, &generated] {
            state.held.extend_from_slice(tokens);
            state.hash.extend(tokens);
        }
        // The engine writes calls in the chat format; a worker would parse them into items.
        let action = if text.contains(TOOL_CALL_OPEN) {
            ModelAction::ToolCall { call_id: format!("call_{turn}") }
        } else {
            ModelAction::Answer
        };
        Ok(TurnReply { sample, response_id: None, output: Vec::new(), action })
    }
}

const TOOL_CALL_OPEN: &str = "<tool_call>";

/// Tokenizes the workflow's new input per turn the way the worker's ChatML renderer does
/// (each piece on its own): the tools header and the user message, then after each call
/// (generated inside the open assistant block) the tool output, each ending by opening the
/// assistant block the model generates into.
fn render_segments(bpe: &CoreBPE, plan: &WorkflowPlan) -> Vec<Vec<u32>> {
    let piece = |text: &str| bpe.encode_ordinary(text);
    let open_assistant = piece("<|im_start|>assistant\n");
    let close = piece("<|im_end|>\n");
    let mut header = String::from(
        "\n\n# Tools\nCall a function by writing \
         <tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call>.\n",
    );
    header.push_str(&tool_definition().to_string());
    header.push('\n');
    let first = [
        piece("<|im_start|>system\n"),
        piece(&header),
        close.clone(),
        piece("<|im_start|>user\n"),
        piece(&plan.user_text),
        close.clone(),
        open_assistant.clone(),
    ];
    let mut segments = vec![first.concat()];
    for output in &plan.tool_outputs {
        let tool_turn =
            [close.clone(), piece("<|im_start|>tool\n"), piece(output), close.clone(), open_assistant.clone()];
        segments.push(tool_turn.concat());
    }
    segments
}

fn generate_request(
    ctx: &ModeContext,
    conv: &Conversation<'_>,
    state: &DirectSession,
    tokens: Vec<u32>,
) -> GenerateRequest {
    let hints = HashMap::from([
        (HINT_TOOL_CALLS.to_owned(), conv.plan.turns().to_string()),
        (HINT_OUTPUT_TOKENS.to_owned(), conv.plan.output_tokens.to_string()),
    ]);
    GenerateRequest {
        session: state.session,
        model: ctx.config.target.model.clone(),
        prefix_len: state.held.len() as u32,
        prefix_hash: state.hash.0,
        tokens,
        full: state.held.is_empty(),
        sampling: Some(Sampling { temperature: None, top_p: None, max_output_tokens: 0 }),
        tools: Some(ToolSpec {
            tools_json: Value::Array(vec![tool_definition()]).to_string(),
            choice: ToolChoice::Auto as i32,
            function: String::new(),
            tool_outputs_seen: conv.tool_outputs_seen,
        }),
        hints,
        prefill_only: false,
        output_format: None,
        resume_tokens: 0,
        cache_scope: 0,
    }
}

async fn connect(addr: &str) -> Result<ShardClient<Channel>, TurnError> {
    let endpoint = Endpoint::from_shared(addr.to_owned())
        .map_err(|e| TurnError::new(ErrorClass::Connect, format!("bad shard address {addr}: {e}")))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(10));
    let channel =
        endpoint.connect().await.map_err(|e| TurnError::new(ErrorClass::Connect, format!("shard {addr}: {e}")))?;
    Ok(ShardClient::new(channel))
}

fn grpc_error(status: tonic::Status) -> TurnError {
    TurnError::new(ErrorClass::Grpc(format!("{:?}", status.code())), status.message().to_owned())
}

#[cfg(test)]
mod tests {
    use super::PrefixHash;

    #[test]
    fn prefix_hash_is_fnv1a_over_le_bytes() {
        let mut hash = PrefixHash::new();
        hash.extend(&[]);
        assert_eq!(hash.0, 0xcbf2_9ce4_8422_2325);
        // FNV-1a 64 of the bytes 01 00 00 00, computed independently.
        let mut expected: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in [1u8, 0, 0, 0] {
            expected = (expected ^ u64::from(byte)).wrapping_mul(0x100_0000_01b3);
        }
        hash.extend(&[1]);
        assert_eq!(hash.0, expected);
    }
}
