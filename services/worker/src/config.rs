//! Worker configuration: clap arguments and the validated [`WorkerConfig`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use tether_common::config::CommonArgs;
use tether_common::tls::Tls;

use crate::budget::PrefillLimit;
use crate::session::CacheLimits;
use crate::shard_pool::ShardPlacement;

/// The worker's defaults that the clap attributes and [`WorkerConfig::for_test`] share,
/// written once. Durations are humantime strings, as the flags take them.
pub mod defaults {
    pub const CACHE_TTL: &str = "1h";
    pub const DEFAULT_MODEL: &str = "tether-sim";
    pub const TENANT_PREFILL_TOKENS_PER_SECOND: u32 = 10_000_000;
    pub const TENANT_PREFILL_BURST: u32 = 20_000_000;
    /// 16 MiB of token ids: the last turn of ~250 stateless sessions of 16k tokens.
    pub const STATELESS_HELD_TOKENS: usize = 4_000_000;
}

#[derive(Clone, Debug, Args)]
pub struct WorkerArgs {
    /// Address to listen on for gRPC and the operations endpoints.
    #[arg(long, env = "TETHER_WORKER_LISTEN", default_value = "127.0.0.1:7000")]
    pub listen: SocketAddr,

    /// Address peers dial (defaults to the bound address).
    #[arg(long, env = "TETHER_WORKER_ADVERTISE")]
    pub advertise: Option<String>,

    /// Node id in membership (defaults to `worker-<port>`).
    #[arg(long, env = "TETHER_WORKER_ID")]
    pub id: Option<String>,

    /// Memory bound of the session cache, in bytes.
    #[arg(long, env = "TETHER_WORKER_CACHE_BYTES", default_value_t = 1 << 30, help_heading = "Session cache")]
    pub cache_bytes: usize,

    /// Entry bound of the session cache.
    #[arg(long, env = "TETHER_WORKER_CACHE_ENTRIES", default_value_t = 1_000_000, help_heading = "Session cache")]
    pub cache_entries: usize,

    /// How long a response's state stays resolvable.
    #[arg(long, env = "TETHER_WORKER_CACHE_TTL", value_parser = humantime::parse_duration, default_value = defaults::CACHE_TTL, help_heading = "Session cache")]
    pub cache_ttl: Duration,

    /// Tokens remembered of the last prompt and output of each stateless session (no
    /// `previous_response_id`), so its next turn, which resends the history, claims them from
    /// the shard and sends only what is new (0: every stateless turn is sent whole).
    #[arg(long, env = "TETHER_WORKER_STATELESS_HELD_TOKENS", default_value_t = defaults::STATELESS_HELD_TOKENS, help_heading = "Session cache")]
    pub stateless_held_tokens: usize,

    /// Model used when a request names none.
    #[arg(long, env = "TETHER_WORKER_DEFAULT_MODEL", default_value = defaults::DEFAULT_MODEL)]
    pub default_model: String,

    /// When completed store=true responses are copied to their ring successor.
    #[arg(long, env = "TETHER_WORKER_REPLICATION", value_enum, default_value_t = ReplicationMode::Sync)]
    pub replication: ReplicationMode,

    /// Extra safety patterns, `category=phrase` (repeatable).
    #[arg(long = "safety-pattern", env = "TETHER_WORKER_SAFETY_PATTERNS", value_delimiter = ';', value_parser = parse_pattern)]
    pub safety_patterns: Vec<(String, String)>,

    /// A model served by llama shards, `NAME=PATH` to its GGUF file (repeatable): prompts for
    /// it are rendered with the model's own vocabulary and chat template.
    #[arg(long = "llama-model", env = "TETHER_WORKER_LLAMA_MODELS", value_delimiter = ';', value_parser = parse_llama_model)]
    pub llama_models: Vec<(String, PathBuf)>,

    /// How a turn picks its shard: the session's owner (its KV cache is warm there) or
    /// round-robin (the affinity benchmark's baseline).
    #[arg(long, env = "TETHER_WORKER_SHARD_PLACEMENT", value_enum, default_value_t = ShardPlacement::Affinity)]
    pub shard_placement: ShardPlacement,

    /// Uncached prompt tokens one tenant may have shards prefill per second; a tenant past
    /// its budget gets `rate_limit_exceeded` (HTTP 429) until it refills.
    #[arg(
        long = "tenant-prefill-tokens-per-second",
        env = "TETHER_WORKER_TENANT_PREFILL_TOKENS_PER_SECOND",
        default_value_t = defaults::TENANT_PREFILL_TOKENS_PER_SECOND,
        help_heading = "Limits"
    )]
    pub tenant_prefill_tokens_per_second: u32,

    /// Uncached prompt tokens one tenant may send at once before the per-second budget applies.
    #[arg(
        long = "tenant-prefill-burst",
        env = "TETHER_WORKER_TENANT_PREFILL_BURST",
        default_value_t = defaults::TENANT_PREFILL_BURST,
        help_heading = "Limits"
    )]
    pub tenant_prefill_burst: u32,

    #[command(flatten)]
    pub common: CommonArgs,
}

fn parse_llama_model(text: &str) -> Result<(String, PathBuf), String> {
    match text.split_once('=') {
        Some((name, path)) if !name.is_empty() && !path.is_empty() => Ok((name.into(), path.into())),
        _ => Err(format!("expected NAME=PATH, got {text:?}")),
    }
}

fn parse_pattern(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((category, phrase)) if !category.is_empty() && !phrase.is_empty() => Ok((category.into(), phrase.into())),
        _ => Err(format!("expected category=phrase, got {text:?}")),
    }
}

#[derive(Clone, Debug)]
pub struct WorkerConfig {
    pub id: Option<String>,
    pub advertise: Option<String>,
    pub cache: CacheLimits,
    /// Tokens remembered of stateless sessions' last turns (`session::held`).
    pub stateless_held_tokens: usize,
    pub default_model: String,
    pub safety_patterns: Vec<(String, String)>,
    pub replication: ReplicationMode,
    /// Models served by llama shards and their GGUF files.
    pub llama_models: Vec<(String, PathBuf)>,
    pub shard_placement: ShardPlacement,
    /// The per-tenant budget of uncached prefill tokens.
    pub prefill_limit: PrefillLimit,
    pub shutdown_grace: Duration,
    /// Mutual TLS on this worker's port and on its calls to workers and shards.
    pub tls: Option<Tls>,
    /// Offer this node's router to the nodes of the same process as an in-memory link
    /// (`tether_common::link`), instead of loopback gRPC: `tether dev`.
    pub in_memory_links: bool,
}

impl WorkerConfig {
    pub fn for_test() -> Self {
        WorkerConfig {
            id: None,
            advertise: None,
            // a smaller cache than the flags' defaults (1 GiB, 1,000,000 entries)
            cache: CacheLimits {
                max_bytes: 256 << 20,
                max_entries: 100_000,
                ttl: humantime::parse_duration(defaults::CACHE_TTL).expect("the default ttl parses"),
            },
            stateless_held_tokens: defaults::STATELESS_HELD_TOKENS,
            default_model: defaults::DEFAULT_MODEL.into(),
            safety_patterns: Vec::new(),
            replication: ReplicationMode::Sync,
            llama_models: Vec::new(),
            shard_placement: ShardPlacement::Affinity,
            prefill_limit: PrefillLimit {
                tokens_per_second: defaults::TENANT_PREFILL_TOKENS_PER_SECOND,
                burst: defaults::TENANT_PREFILL_BURST,
            },
            shutdown_grace: Duration::from_secs(5),
            tls: None,
            in_memory_links: false,
        }
    }
}

impl From<WorkerArgs> for WorkerConfig {
    fn from(args: WorkerArgs) -> Self {
        WorkerConfig {
            id: args.id,
            advertise: args.advertise,
            cache: CacheLimits { max_bytes: args.cache_bytes, max_entries: args.cache_entries, ttl: args.cache_ttl },
            stateless_held_tokens: args.stateless_held_tokens,
            default_model: args.default_model,
            safety_patterns: args.safety_patterns,
            replication: args.replication,
            llama_models: args.llama_models,
            shard_placement: args.shard_placement,
            prefill_limit: PrefillLimit {
                tokens_per_second: args.tenant_prefill_tokens_per_second,
                burst: args.tenant_prefill_burst,
            },
            shutdown_grace: args.common.shutdown_grace,
            // loaded and checked by the caller (`TlsArgs::load` reads files and can fail)
            tls: None,
            in_memory_links: false,
        }
    }
}

/// When a completed response is copied to its replica.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum ReplicationMode {
    /// Before the terminal event: a client that saw `completed` can continue after a crash.
    #[default]
    Sync,
    /// After the terminal event, off the critical path.
    Async,
    Off,
}
