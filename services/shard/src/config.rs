//! Shard configuration: clap arguments and the validated [`ShardConfig`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use tether_common::config::CommonArgs;
use tether_common::tls::Tls;

pub use crate::engine::openai::config::{OpenAiArgs, OpenAiConfig, PromptMode};
use crate::engine::sim::SimConfig;

/// The shard's defaults, written once: the clap attributes and the `Default` impls (used by
/// `tether dev` and the tests, which parse no command line) both read them.
pub mod defaults {
    pub const LISTEN: &str = "127.0.0.1:7100";
    pub const CACHE_TOKENS: u64 = 4_000_000;
    /// vLLM's default block size.
    pub const CACHE_BLOCK_TOKENS: u32 = 16;
    pub const LLAMA_CONTEXT_TOKENS: u32 = 8192;
    pub const LLAMA_SEQUENCES: u32 = 16;
    pub const LLAMA_BATCH_TOKENS: u32 = 512;
    pub const LLAMA_MAX_OUTPUT_TOKENS: u32 = 512;
    pub const SIM_MODEL: &str = "tether-sim";
    /// A humantime duration, as the flag takes it.
    pub const SIM_TTFT_BASE: &str = "2ms";
    pub const SIM_PREFILL_US_PER_TOKEN: f64 = 20.0;
    pub const SIM_DECODE_TOKENS_PER_SECOND: f64 = 1000.0;
    pub const SIM_SLOTS: u32 = 64;
    pub const SIM_OUTPUT_TOKENS: u32 = 32;
    pub const SIM_CONTEXT_WINDOW: u32 = 32_768;
}

#[derive(Clone, Debug, Args)]
pub struct ShardArgs {
    /// Address to listen on for gRPC and the operations endpoints.
    #[arg(long, env = "TETHER_SHARD_LISTEN", default_value = defaults::LISTEN)]
    pub listen: SocketAddr,

    /// Address peers dial (defaults to the bound address).
    #[arg(long, env = "TETHER_SHARD_ADVERTISE")]
    pub advertise: Option<String>,

    /// Node id in membership (defaults to `shard-<port>`).
    #[arg(long, env = "TETHER_SHARD_ID")]
    pub id: Option<String>,

    /// Total tokens the KV cache may hold across sessions (LRU beyond it).
    #[arg(long, env = "TETHER_SHARD_CACHE_TOKENS", default_value_t = defaults::CACHE_TOKENS, help_heading = "Cache")]
    pub cache_tokens: u64,

    /// Tokens per block of the content-addressed prefix index (an engine that can share
    /// cached prefixes across sessions, the sim, matches stateless prompts block by block).
    #[arg(
        long,
        env = "TETHER_SHARD_CACHE_BLOCK_TOKENS",
        default_value_t = defaults::CACHE_BLOCK_TOKENS,
        value_parser = clap::value_parser!(u32).range(1..),
        help_heading = "Cache"
    )]
    pub cache_block_tokens: u32,

    #[command(flatten)]
    pub sim: SimArgs,

    #[command(flatten)]
    pub engine: EngineArgs,

    #[command(flatten)]
    pub common: CommonArgs,
}

/// Which engine a shard runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum EngineKind {
    /// The deterministic simulated model.
    #[default]
    Sim,
    /// llama.cpp with a GGUF model (needs the `llama` cargo feature).
    Llama,
    /// An OpenAI-compatible completion server (vLLM, SGLang, llama.cpp's server,
    /// llama-cpp-python) at `--upstream`: the shard is its sidecar.
    Openai,
}

/// The engine choice and the llama and openai engines' settings.
#[derive(Clone, Debug, Args)]
pub struct EngineArgs {
    /// Inference engine.
    #[arg(long, env = "TETHER_SHARD_ENGINE", value_enum, default_value_t = EngineKind::Sim, help_heading = "Engine")]
    pub engine: EngineKind,

    /// The llama engine: its GGUF model file (`scripts/fetch-model.sh` fetches SmolLM2-135M).
    /// The openai engine: the model name clients ask for.
    #[arg(
        long,
        env = "TETHER_LLAMA_MODEL",
        required_if_eq("engine", "llama"),
        required_if_eq("engine", "openai"),
        help_heading = "Engine"
    )]
    pub model: Option<PathBuf>,

    /// Model name clients ask for (defaults to the file name up to its first dot, lowercased).
    #[arg(long, env = "TETHER_LLAMA_MODEL_NAME", help_heading = "Engine")]
    pub model_name: Option<String>,

    /// KV cache size in tokens, shared by every session (one unified llama.cpp cache).
    #[arg(long = "llama-context", env = "TETHER_LLAMA_CONTEXT", default_value_t = defaults::LLAMA_CONTEXT_TOKENS, help_heading = "Engine")]
    pub context_tokens: u32,

    /// Sessions held at once (llama.cpp sequences); the least recently used is evicted beyond it.
    #[arg(long = "llama-sequences", env = "TETHER_LLAMA_SEQUENCES", default_value_t = defaults::LLAMA_SEQUENCES, help_heading = "Engine")]
    pub sequences: u32,

    /// CPU threads for decoding (defaults to the available cores).
    #[arg(long = "llama-threads", env = "TETHER_LLAMA_THREADS", help_heading = "Engine")]
    pub threads: Option<u32>,

    /// Tokens per llama.cpp decode call (prefill chunk size).
    #[arg(long = "llama-batch", env = "TETHER_LLAMA_BATCH", default_value_t = defaults::LLAMA_BATCH_TOKENS, help_heading = "Engine")]
    pub batch_tokens: u32,

    /// Output length when a request sets no `max_output_tokens`.
    #[arg(
        long = "llama-max-output-tokens",
        env = "TETHER_LLAMA_MAX_OUTPUT_TOKENS",
        default_value_t = defaults::LLAMA_MAX_OUTPUT_TOKENS,
        help_heading = "Engine"
    )]
    pub max_output_tokens: u32,

    #[command(flatten)]
    pub openai: OpenAiArgs,
}

impl Default for EngineArgs {
    fn default() -> Self {
        EngineArgs {
            engine: EngineKind::Sim,
            model: None,
            model_name: None,
            context_tokens: defaults::LLAMA_CONTEXT_TOKENS,
            sequences: defaults::LLAMA_SEQUENCES,
            threads: None,
            batch_tokens: defaults::LLAMA_BATCH_TOKENS,
            max_output_tokens: defaults::LLAMA_MAX_OUTPUT_TOKENS,
            openai: OpenAiArgs::default(),
        }
    }
}

impl EngineArgs {
    /// The llama engine's configuration, when the llama engine is chosen.
    pub fn llama(&self) -> Option<LlamaConfig> {
        if self.engine != EngineKind::Llama {
            return None;
        }
        // clap requires `--model` with `--engine llama`.
        let path = self.model.clone()?;
        let mut config = LlamaConfig::new(path);
        if let Some(name) = &self.model_name {
            config.model_name = name.clone();
        }
        config.context_tokens = self.context_tokens.max(256);
        config.sequences = self.sequences.clamp(1, 256);
        if let Some(threads) = self.threads {
            config.threads = threads.max(1);
        }
        config.batch_tokens = self.batch_tokens.max(32);
        config.max_output_tokens = self.max_output_tokens.max(1);
        Some(config)
    }

    /// The openai engine's configuration, when the openai engine is chosen.
    pub fn openai(&self) -> Option<OpenAiConfig> {
        if self.engine != EngineKind::Openai {
            return None;
        }
        // clap requires `--model` (the served name) with `--engine openai`.
        let model_name = self.model.as_ref()?.to_string_lossy().into_owned();
        Some(self.openai.config(model_name))
    }
}

/// The llama engine's settings (plain data: present whether or not the `llama` feature is built).
#[derive(Clone, Debug)]
pub struct LlamaConfig {
    pub model_path: PathBuf,
    pub model_name: String,
    pub context_tokens: u32,
    pub sequences: u32,
    pub threads: u32,
    pub batch_tokens: u32,
    pub max_output_tokens: u32,
}

impl LlamaConfig {
    /// Defaults for the model at `model_path`: the `--llama-*` flags' defaults, every core.
    pub fn new(model_path: PathBuf) -> Self {
        LlamaConfig {
            model_name: default_model_name(&model_path),
            model_path,
            context_tokens: defaults::LLAMA_CONTEXT_TOKENS,
            sequences: defaults::LLAMA_SEQUENCES,
            threads: std::thread::available_parallelism().map_or(2, |n| n.get() as u32),
            batch_tokens: defaults::LLAMA_BATCH_TOKENS,
            max_output_tokens: defaults::LLAMA_MAX_OUTPUT_TOKENS,
        }
    }
}

/// `SmolLM2-135M-Instruct.Q4_1.gguf` → `smollm2-135m-instruct`.
pub fn default_model_name(path: &std::path::Path) -> String {
    let file = path.file_name().and_then(|name| name.to_str()).unwrap_or("llama");
    file.split('.').next().filter(|stem| !stem.is_empty()).unwrap_or("llama").to_lowercase()
}

/// The sim engine's cost model and output policy.
#[derive(Clone, Debug, Args)]
pub struct SimArgs {
    /// Model names the sim engine answers to.
    #[arg(
        long = "sim-model",
        env = "TETHER_SIM_MODELS",
        value_delimiter = ',',
        default_value = defaults::SIM_MODEL,
        help_heading = "Sim engine"
    )]
    pub models: Vec<String>,

    /// Fixed time to first token.
    #[arg(long = "sim-ttft-base", env = "TETHER_SIM_TTFT_BASE", value_parser = humantime::parse_duration, default_value = defaults::SIM_TTFT_BASE, help_heading = "Sim engine")]
    pub ttft_base: Duration,

    /// Prefill cost per uncached prompt token, in microseconds.
    #[arg(
        long = "sim-prefill-us-per-token",
        env = "TETHER_SIM_PREFILL_US_PER_TOKEN",
        default_value_t = defaults::SIM_PREFILL_US_PER_TOKEN,
        help_heading = "Sim engine"
    )]
    pub prefill_us_per_token: f64,

    /// Decode rate in tokens per second.
    #[arg(
        long = "sim-decode-tps",
        env = "TETHER_SIM_DECODE_TPS",
        default_value_t = defaults::SIM_DECODE_TOKENS_PER_SECOND,
        help_heading = "Sim engine"
    )]
    pub decode_tokens_per_second: f64,

    /// Concurrent decode slots; further requests queue.
    #[arg(long = "sim-slots", env = "TETHER_SIM_SLOTS", default_value_t = defaults::SIM_SLOTS, help_heading = "Sim engine")]
    pub slots: u32,

    /// Length of a text answer unless the request says otherwise.
    #[arg(
        long = "sim-output-tokens",
        env = "TETHER_SIM_OUTPUT_TOKENS",
        default_value_t = defaults::SIM_OUTPUT_TOKENS,
        help_heading = "Sim engine"
    )]
    pub output_tokens: u32,

    /// The sim model's context window in tokens (prompt plus output); a longer prompt is
    /// refused with `context_length_exceeded`. The default is a real small model's (32k).
    #[arg(
        long = "sim-context-window",
        env = "TETHER_SIM_CONTEXT_WINDOW",
        default_value_t = defaults::SIM_CONTEXT_WINDOW,
        help_heading = "Sim engine"
    )]
    pub context_window: u32,
}

impl Default for SimArgs {
    fn default() -> Self {
        SimArgs {
            models: vec![defaults::SIM_MODEL.into()],
            ttft_base: humantime::parse_duration(defaults::SIM_TTFT_BASE).expect("the default duration parses"),
            prefill_us_per_token: defaults::SIM_PREFILL_US_PER_TOKEN,
            decode_tokens_per_second: defaults::SIM_DECODE_TOKENS_PER_SECOND,
            slots: defaults::SIM_SLOTS,
            output_tokens: defaults::SIM_OUTPUT_TOKENS,
            context_window: defaults::SIM_CONTEXT_WINDOW,
        }
    }
}

impl From<SimArgs> for SimConfig {
    fn from(args: SimArgs) -> Self {
        SimConfig {
            models: args.models,
            ttft_base: args.ttft_base,
            prefill_per_token: Duration::from_nanos((args.prefill_us_per_token * 1000.0) as u64),
            decode_interval: Duration::from_nanos((1e9 / args.decode_tokens_per_second.max(1.0)) as u64),
            slots: args.slots.max(1),
            output_tokens: args.output_tokens,
            context_window: args.context_window.max(1),
            structured_outputs: true,
        }
    }
}

/// The validated shard configuration.
#[derive(Clone, Debug)]
pub struct ShardConfig {
    pub id: Option<String>,
    pub advertise: Option<String>,
    pub cache_tokens: u64,
    pub cache_block_tokens: u32,
    pub sim: SimConfig,
    /// Runs the llama engine instead of the sim when set.
    pub llama: Option<LlamaConfig>,
    /// Runs the openai engine (an OpenAI-compatible server behind the shard) when set.
    pub openai: Option<OpenAiConfig>,
    pub shutdown_grace: Duration,
    /// Mutual TLS on this shard's port and on its calls to other shards.
    pub tls: Option<Tls>,
    /// Offer this node's router to the nodes of the same process as an in-memory link
    /// (`tether_common::link`), instead of loopback gRPC: `tether dev`.
    pub in_memory_links: bool,
}

impl ShardConfig {
    /// A small, fast configuration for tests.
    pub fn for_test() -> Self {
        ShardConfig {
            id: None,
            advertise: None,
            cache_tokens: 1_000_000,
            cache_block_tokens: defaults::CACHE_BLOCK_TOKENS,
            sim: SimArgs::default().into(),
            llama: None,
            openai: None,
            shutdown_grace: Duration::from_secs(5),
            tls: None,
            in_memory_links: false,
        }
    }
}

impl ShardConfig {
    /// A sim shard with default cache settings (the single-process cluster).
    pub fn from_sim(sim: SimArgs, shutdown_grace: Duration) -> Self {
        ShardConfig {
            id: None,
            advertise: None,
            cache_tokens: defaults::CACHE_TOKENS,
            cache_block_tokens: defaults::CACHE_BLOCK_TOKENS,
            sim: sim.into(),
            llama: None,
            openai: None,
            shutdown_grace,
            tls: None,
            in_memory_links: false,
        }
    }

    /// A shard running the engine `engine` chooses (the sim's settings apply to the sim).
    pub fn from_engine(sim: SimArgs, engine: &EngineArgs, shutdown_grace: Duration) -> Self {
        ShardConfig { llama: engine.llama(), openai: engine.openai(), ..Self::from_sim(sim, shutdown_grace) }
    }
}

impl From<ShardArgs> for ShardConfig {
    fn from(args: ShardArgs) -> Self {
        ShardConfig {
            id: args.id,
            advertise: args.advertise,
            cache_tokens: args.cache_tokens,
            cache_block_tokens: args.cache_block_tokens,
            sim: args.sim.into(),
            llama: args.engine.llama(),
            openai: args.engine.openai(),
            shutdown_grace: args.common.shutdown_grace,
            // loaded and checked by the caller (`TlsArgs::load` reads files and can fail)
            tls: None,
            in_memory_links: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::{EngineArgs, SimArgs};

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        sim: SimArgs,
        #[command(flatten)]
        engine: EngineArgs,
    }

    /// `Default` and the flags' defaults come from the same constants; this holds them equal
    /// (when no `TETHER_SIM_*` or `TETHER_LLAMA_*` variable is set, as clap reads them).
    #[test]
    fn defaults_match_an_empty_command_line() {
        let set_in_env = std::env::vars()
            .any(|(name, _)| ["TETHER_SIM_", "TETHER_LLAMA_", "TETHER_OPENAI_"].iter().any(|p| name.starts_with(p)));
        if set_in_env {
            return;
        }
        let flags = Flags::try_parse_from(["shard"]).expect("an empty command line parses");
        assert_eq!(format!("{:?}", flags.sim), format!("{:?}", SimArgs::default()));
        assert_eq!(format!("{:?}", flags.engine), format!("{:?}", EngineArgs::default()));
    }
}
