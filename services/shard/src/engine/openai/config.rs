//! The openai engine's flags and its validated configuration (plain data).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

/// The openai engine's defaults, written once for the flags and `Default`.
pub mod defaults {
    pub const PROMPT: super::PromptMode = super::PromptMode::Auto;
    pub const CONNECT_TIMEOUT: &str = "2s";
    pub const FIRST_TOKEN_TIMEOUT: &str = "120s";
    pub const IDLE_TIMEOUT: &str = "30s";
    pub const HEALTH_INTERVAL: &str = "2s";
    pub const CONTEXT_TOKENS: u32 = 8192;
    pub const MAX_OUTPUT_TOKENS: u32 = 512;
    pub const SLOTS: u32 = 16;
}

/// How the shard sends a prompt to the engine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum PromptMode {
    /// Token ids first (vLLM and SGLang take them); the rendered text once the engine refuses
    /// a token-id prompt (llama.cpp's servers), for the rest of the process.
    #[default]
    Auto,
    /// Token ids only.
    Tokens,
    /// The rendered text only (needs `--openai-vocabulary`).
    Text,
}

/// The openai engine's flags (`--engine openai`).
#[derive(Clone, Debug, Args)]
pub struct OpenAiArgs {
    /// Base URL of the engine server (`http://127.0.0.1:8000`). Several (repeated or
    /// comma-separated) form a pool of replicas of one model: a session stays on one replica.
    #[arg(
        id = "openai_upstreams",
        long = "upstream",
        env = "TETHER_OPENAI_UPSTREAM",
        value_delimiter = ',',
        required_if_eq("engine", "openai"),
        help_heading = "OpenAI-compatible engine"
    )]
    pub upstreams: Vec<String>,

    /// The model name the engine server answers to (defaults to `--model`).
    #[arg(
        id = "openai_engine_model",
        long = "openai-engine-model",
        env = "TETHER_OPENAI_ENGINE_MODEL",
        help_heading = "OpenAI-compatible engine"
    )]
    pub engine_model: Option<String>,

    /// How prompts are sent: token ids, the rendered text, or ids until the engine refuses them.
    #[arg(id = "openai_prompt", long = "openai-prompt", env = "TETHER_OPENAI_PROMPT", value_enum, default_value_t = defaults::PROMPT, help_heading = "OpenAI-compatible engine")]
    pub prompt: PromptMode,

    /// GGUF file of the served model: its vocabulary turns token ids into the prompt text and
    /// the engine's text into token ids (the worker renders with the same file).
    #[arg(
        id = "openai_vocabulary",
        long = "openai-vocabulary",
        env = "TETHER_OPENAI_VOCABULARY",
        help_heading = "OpenAI-compatible engine"
    )]
    pub vocabulary: Option<PathBuf>,

    /// Deadline for connecting to the engine.
    #[arg(id = "openai_connect_timeout", long = "openai-connect-timeout", env = "TETHER_OPENAI_CONNECT_TIMEOUT", value_parser = humantime::parse_duration, default_value = defaults::CONNECT_TIMEOUT, help_heading = "OpenAI-compatible engine")]
    pub connect_timeout: Duration,

    /// Deadline for the first streamed chunk (the engine's queue and prefill).
    #[arg(id = "openai_first_token_timeout", long = "openai-first-token-timeout", env = "TETHER_OPENAI_FIRST_TOKEN_TIMEOUT", value_parser = humantime::parse_duration, default_value = defaults::FIRST_TOKEN_TIMEOUT, help_heading = "OpenAI-compatible engine")]
    pub first_token_timeout: Duration,

    /// Longest silence between two streamed chunks.
    #[arg(id = "openai_idle_timeout", long = "openai-idle-timeout", env = "TETHER_OPENAI_IDLE_TIMEOUT", value_parser = humantime::parse_duration, default_value = defaults::IDLE_TIMEOUT, help_heading = "OpenAI-compatible engine")]
    pub idle_timeout: Duration,

    /// How often each upstream's `GET /v1/models` is probed (the shard's readiness).
    #[arg(id = "openai_health_interval", long = "openai-health-interval", env = "TETHER_OPENAI_HEALTH_INTERVAL", value_parser = humantime::parse_duration, default_value = defaults::HEALTH_INTERVAL, help_heading = "OpenAI-compatible engine")]
    pub health_interval: Duration,

    /// The served model's context window in tokens (prompt plus output).
    #[arg(id = "openai_context_tokens", long = "openai-context", env = "TETHER_OPENAI_CONTEXT", default_value_t = defaults::CONTEXT_TOKENS, help_heading = "OpenAI-compatible engine")]
    pub context_tokens: u32,

    /// Output length when a request sets no `max_output_tokens`.
    #[arg(id = "openai_max_output_tokens", long = "openai-max-output-tokens", env = "TETHER_OPENAI_MAX_OUTPUT_TOKENS", default_value_t = defaults::MAX_OUTPUT_TOKENS, help_heading = "OpenAI-compatible engine")]
    pub max_output_tokens: u32,

    /// Concurrent requests the shard reports as its slots (the engine queues beyond its own).
    #[arg(id = "openai_slots", long = "openai-slots", env = "TETHER_OPENAI_SLOTS", default_value_t = defaults::SLOTS, help_heading = "OpenAI-compatible engine")]
    pub slots: u32,
}

fn duration(text: &str) -> Duration {
    humantime::parse_duration(text).expect("the default duration parses")
}

impl Default for OpenAiArgs {
    fn default() -> Self {
        OpenAiArgs {
            upstreams: Vec::new(),
            engine_model: None,
            prompt: defaults::PROMPT,
            vocabulary: None,
            connect_timeout: duration(defaults::CONNECT_TIMEOUT),
            first_token_timeout: duration(defaults::FIRST_TOKEN_TIMEOUT),
            idle_timeout: duration(defaults::IDLE_TIMEOUT),
            health_interval: duration(defaults::HEALTH_INTERVAL),
            context_tokens: defaults::CONTEXT_TOKENS,
            max_output_tokens: defaults::MAX_OUTPUT_TOKENS,
            slots: defaults::SLOTS,
        }
    }
}

impl OpenAiArgs {
    /// The configuration of an engine serving `model_name` to clients.
    pub fn config(&self, model_name: String) -> OpenAiConfig {
        OpenAiConfig {
            upstreams: self.upstreams.iter().map(|url| url.trim().trim_end_matches('/').to_owned()).collect(),
            engine_model: self.engine_model.clone().unwrap_or_else(|| model_name.clone()),
            model_name,
            prompt: self.prompt,
            vocabulary: self.vocabulary.clone(),
            connect_timeout: self.connect_timeout,
            first_token_timeout: self.first_token_timeout,
            idle_timeout: self.idle_timeout,
            health_interval: self.health_interval.max(Duration::from_millis(100)),
            context_tokens: self.context_tokens.max(256),
            max_output_tokens: self.max_output_tokens.max(1),
            slots: self.slots.max(1),
        }
    }
}

/// The openai engine's settings.
#[derive(Clone, Debug)]
pub struct OpenAiConfig {
    /// Base URLs of the replicas, without a trailing slash.
    pub upstreams: Vec<String>,
    /// The name clients ask for.
    pub model_name: String,
    /// The name sent to the engine.
    pub engine_model: String,
    pub prompt: PromptMode,
    pub vocabulary: Option<PathBuf>,
    pub connect_timeout: Duration,
    pub first_token_timeout: Duration,
    pub idle_timeout: Duration,
    pub health_interval: Duration,
    pub context_tokens: u32,
    pub max_output_tokens: u32,
    pub slots: u32,
}

impl OpenAiConfig {
    /// An engine at `upstream` serving `model_name` (its name on the engine too), the flags'
    /// defaults otherwise.
    pub fn new(upstream: impl Into<String>, model_name: impl Into<String>) -> Self {
        let args = OpenAiArgs { upstreams: vec![upstream.into()], ..OpenAiArgs::default() };
        args.config(model_name.into())
    }
}
