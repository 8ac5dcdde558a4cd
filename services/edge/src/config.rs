//! Edge configuration: clap arguments and the validated [`EdgeConfig`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, ValueEnum};
use tether_common::config::CommonArgs;
use tether_common::tls::Tls;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AuthMode {
    /// Any bearer key is accepted; every request belongs to tenant `default` (local use).
    Open,
    /// Only configured keys are accepted, each mapped to its tenant.
    Keys,
}

#[derive(Clone, Debug, Args)]
pub struct EdgeArgs {
    /// Address to listen on for the Responses API and the operations endpoints.
    #[arg(long, env = "TETHER_EDGE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    #[command(flatten)]
    pub limits: EdgeLimitArgs,

    #[command(flatten)]
    pub common: CommonArgs,
}

#[derive(Clone, Debug, Args)]
pub struct EdgeLimitArgs {
    /// How clients authenticate (`tether edge` defaults to keys, `tether dev` to open).
    #[arg(long, env = "TETHER_EDGE_AUTH", value_enum, help_heading = "Auth")]
    pub auth: Option<AuthMode>,

    /// API keys as `key=tenant`, comma separated (with `--auth keys`).
    #[arg(long = "api-key", env = "TETHER_EDGE_API_KEYS", value_delimiter = ',', value_parser = parse_key, help_heading = "Auth")]
    pub api_keys: Vec<(String, String)>,

    /// Largest HTTP body or WebSocket message accepted, in bytes.
    #[arg(long, env = "TETHER_EDGE_MAX_MESSAGE_BYTES", default_value_t = 16 << 20, help_heading = "Limits")]
    pub max_message_bytes: usize,

    /// Open WebSocket connections accepted at once.
    #[arg(long, env = "TETHER_EDGE_MAX_CONNECTIONS", default_value_t = 10_000, help_heading = "Limits")]
    pub max_connections: usize,

    /// Responses in progress at once across all clients of this edge.
    #[arg(long, env = "TETHER_EDGE_MAX_IN_FLIGHT", default_value_t = 4_096, help_heading = "Limits")]
    pub max_in_flight: usize,

    /// Lifetime of a WebSocket connection.
    #[arg(long, env = "TETHER_EDGE_WS_MAX_LIFETIME", value_parser = humantime::parse_duration, default_value = "60m", help_heading = "Limits")]
    pub ws_max_lifetime: Duration,

    /// Bounded-load factor of placement: no worker above this times the average.
    #[arg(long, env = "TETHER_EDGE_LOAD_FACTOR", default_value_t = 1.25, help_heading = "Placement")]
    pub load_factor: f64,
}

fn parse_key(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, tenant)) if !key.is_empty() && !tenant.is_empty() => Ok((key.into(), tenant.into())),
        _ => Err("expected key=tenant".into()),
    }
}

#[derive(Clone, Debug)]
pub struct EdgeConfig {
    pub auth: AuthMode,
    pub api_keys: HashMap<String, String>,
    pub max_message_bytes: usize,
    pub max_connections: usize,
    pub max_in_flight: usize,
    pub ws_max_lifetime: Duration,
    pub load_factor: f64,
    pub shutdown_grace: Duration,
    /// Mutual TLS on the edge's calls to workers (its client port stays plain HTTP).
    pub tls: Option<Tls>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--auth keys needs at least one --api-key key=tenant")]
    NoKeys,
}

impl EdgeConfig {
    pub fn for_test() -> Self {
        EdgeConfig {
            auth: AuthMode::Open,
            api_keys: HashMap::new(),
            max_message_bytes: 16 << 20,
            max_connections: 1_000,
            max_in_flight: 1_000,
            ws_max_lifetime: Duration::from_secs(3600),
            load_factor: 1.25,
            shutdown_grace: Duration::from_secs(5),
            tls: None,
        }
    }

    pub fn from_limits(
        limits: EdgeLimitArgs,
        shutdown_grace: Duration,
        default_auth: AuthMode,
    ) -> Result<Self, ConfigError> {
        let auth = limits.auth.unwrap_or(default_auth);
        if auth == AuthMode::Keys && limits.api_keys.is_empty() {
            return Err(ConfigError::NoKeys);
        }
        Ok(EdgeConfig {
            auth,
            api_keys: limits.api_keys.into_iter().collect(),
            max_message_bytes: limits.max_message_bytes,
            max_connections: limits.max_connections,
            max_in_flight: limits.max_in_flight,
            ws_max_lifetime: limits.ws_max_lifetime,
            load_factor: limits.load_factor,
            shutdown_grace,
            tls: None,
        })
    }
}

impl TryFrom<EdgeArgs> for EdgeConfig {
    type Error = ConfigError;

    fn try_from(args: EdgeArgs) -> Result<Self, ConfigError> {
        EdgeConfig::from_limits(args.limits, args.common.shutdown_grace, AuthMode::Keys)
    }
}
