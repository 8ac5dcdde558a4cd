//! Edge configuration: clap arguments and the validated [`EdgeConfig`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, ValueEnum};
use tether_common::config::CommonArgs;
use tether_common::tls::Tls;

/// The edge's defaults that the clap attributes and [`EdgeConfig::for_test`] share, written
/// once. Durations are humantime strings, as the flags take them.
pub mod defaults {
    use std::time::Duration;

    pub const MAX_MESSAGE_BYTES: usize = 16 << 20;
    pub const WS_MAX_LIFETIME: &str = "60m";
    pub const TENANT_BURST: u32 = 200;
    pub const CLIENT_READ_TIMEOUT: &str = "30s";
    pub const WS_MAX_QUEUED: usize = 64;
    pub const WS_MAX_QUEUED_BYTES: usize = 32 << 20;
    pub const HEADER_READ_TIMEOUT: &str = "10s";
    pub const BODY_READ_TIMEOUT: &str = "30s";
    pub const LOAD_FACTOR: f64 = 1.25;

    /// One of the duration defaults above, parsed.
    pub fn duration(text: &str) -> Duration {
        humantime::parse_duration(text).expect("a default duration parses")
    }
}

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
    #[arg(long, env = "TETHER_EDGE_MAX_MESSAGE_BYTES", default_value_t = defaults::MAX_MESSAGE_BYTES, help_heading = "Limits")]
    pub max_message_bytes: usize,

    /// Open WebSocket connections accepted at once.
    #[arg(long, env = "TETHER_EDGE_MAX_CONNECTIONS", default_value_t = 10_000, help_heading = "Limits")]
    pub max_connections: usize,

    /// Responses in progress at once across all clients of this edge.
    #[arg(long, env = "TETHER_EDGE_MAX_IN_FLIGHT", default_value_t = 4_096, help_heading = "Limits")]
    pub max_in_flight: usize,

    /// Lifetime of a WebSocket connection.
    #[arg(long, env = "TETHER_EDGE_WS_MAX_LIFETIME", value_parser = humantime::parse_duration, default_value = defaults::WS_MAX_LIFETIME, help_heading = "Limits")]
    pub ws_max_lifetime: Duration,

    /// Responses in progress at once per tenant [default: --max-in-flight divided by the
    /// number of tenants, at most by 4].
    #[arg(long, env = "TETHER_EDGE_TENANT_MAX_IN_FLIGHT", help_heading = "Tenant limits")]
    pub tenant_max_in_flight: Option<usize>,

    /// Open WebSocket connections per tenant [default: --max-connections divided by the number
    /// of tenants, at most by 4].
    #[arg(long, env = "TETHER_EDGE_TENANT_MAX_CONNECTIONS", help_heading = "Tenant limits")]
    pub tenant_max_connections: Option<usize>,

    /// Requests per second per tenant (token bucket refill rate): creates over HTTP and
    /// WebSocket, retrieves, deletes, model lists and WebSocket handshakes [default: 100 with
    /// `--auth keys`; unlimited with `--auth open`, whose one tenant is every client].
    #[arg(long, env = "TETHER_EDGE_TENANT_RATE", help_heading = "Tenant limits")]
    pub tenant_rate: Option<f64>,

    /// Requests a tenant may make at once above its rate (token bucket size).
    #[arg(long, env = "TETHER_EDGE_TENANT_BURST", default_value_t = defaults::TENANT_BURST, help_heading = "Tenant limits")]
    pub tenant_burst: u32,

    /// One tenant's own limit as `tenant:limit=value`, limit one of `max-in-flight`,
    /// `max-connections`, `rate`, `burst`; comma separated, e.g. `alpha:max-in-flight=512,alpha:rate=400`.
    #[arg(long = "tenant-limit", env = "TETHER_EDGE_TENANT_LIMITS", value_delimiter = ',', value_parser = parse_tenant_limit, help_heading = "Tenant limits")]
    pub tenant_limits: Vec<TenantLimit>,

    /// A response whose client reads nothing for this long is cancelled and frees its slot
    /// (the WebSocket connection closes; the SSE stream is cut).
    #[arg(long, env = "TETHER_EDGE_CLIENT_READ_TIMEOUT", value_parser = humantime::parse_duration, default_value = defaults::CLIENT_READ_TIMEOUT, help_heading = "Limits")]
    pub client_read_timeout: Duration,

    /// Creates queued (not yet started) on one WebSocket connection; more get an `error` event.
    #[arg(long, env = "TETHER_EDGE_WS_MAX_QUEUED", default_value_t = defaults::WS_MAX_QUEUED, help_heading = "Limits")]
    pub ws_max_queued: usize,

    /// Bytes of creates queued on one WebSocket connection; more get an `error` event.
    #[arg(long, env = "TETHER_EDGE_WS_MAX_QUEUED_BYTES", default_value_t = defaults::WS_MAX_QUEUED_BYTES, help_heading = "Limits")]
    pub ws_max_queued_bytes: usize,

    /// Time a client has to send a request's headers (HTTP/1.1; also the idle keep-alive limit).
    #[arg(long, env = "TETHER_EDGE_HEADER_READ_TIMEOUT", value_parser = humantime::parse_duration, default_value = defaults::HEADER_READ_TIMEOUT, help_heading = "Limits")]
    pub header_read_timeout: Duration,

    /// Time a client has to send a whole request body; past it the request gets 408.
    #[arg(long, env = "TETHER_EDGE_BODY_READ_TIMEOUT", value_parser = humantime::parse_duration, default_value = defaults::BODY_READ_TIMEOUT, help_heading = "Limits")]
    pub body_read_timeout: Duration,

    /// HTTP connections open at once (not counting those upgraded to WebSocket, which
    /// --max-connections bounds); past it a new connection gets 503 and is closed.
    #[arg(long, env = "TETHER_EDGE_MAX_HTTP_CONNECTIONS", default_value_t = 10_000, help_heading = "Limits")]
    pub max_http_connections: usize,

    /// Bearer key that may read `GET /v1/cluster` with `--auth keys` (refused with 403 when
    /// unset). Open auth leaves the cluster view open.
    #[arg(long, env = "TETHER_EDGE_ADMIN_KEY", hide_env_values = true, help_heading = "Auth")]
    pub admin_key: Option<String>,

    /// Bounded-load factor of placement: no worker above this times the average.
    #[arg(long, env = "TETHER_EDGE_LOAD_FACTOR", default_value_t = defaults::LOAD_FACTOR, help_heading = "Placement")]
    pub load_factor: f64,
}

/// Which per-tenant limit a `--tenant-limit` sets.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum TenantLimitKind {
    MaxInFlight(usize),
    MaxConnections(usize),
    Rate(f64),
    Burst(u32),
}

/// One `--tenant-limit tenant:limit=value`.
#[derive(Clone, Debug, PartialEq)]
pub struct TenantLimit {
    pub tenant: String,
    pub limit: TenantLimitKind,
}

fn parse_tenant_limit(text: &str) -> Result<TenantLimit, String> {
    const EXPECTED: &str = "expected tenant:limit=value, limit one of max-in-flight, max-connections, rate, burst";
    let (tenant, setting) = text.split_once(':').ok_or(EXPECTED)?;
    let (name, value) = setting.split_once('=').ok_or(EXPECTED)?;
    let number = || format!("{EXPECTED}: '{value}' is not a valid value");
    let limit = match name {
        "max-in-flight" => TenantLimitKind::MaxInFlight(value.parse().map_err(|_| number())?),
        "max-connections" => TenantLimitKind::MaxConnections(value.parse().map_err(|_| number())?),
        "rate" => TenantLimitKind::Rate(value.parse().map_err(|_| number())?),
        "burst" => TenantLimitKind::Burst(value.parse().map_err(|_| number())?),
        _ => return Err(EXPECTED.into()),
    };
    if tenant.is_empty() {
        return Err(EXPECTED.into());
    }
    Ok(TenantLimit { tenant: tenant.into(), limit })
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
    /// `None`: the edge-wide limit divided by the number of tenants, at most by 4.
    pub tenant_max_in_flight: Option<usize>,
    /// `None`: the edge-wide limit divided by the number of tenants, at most by 4.
    pub tenant_max_connections: Option<usize>,
    /// `None`: 100 per second with keys, unlimited with open auth.
    pub tenant_rate: Option<f64>,
    pub tenant_burst: u32,
    pub tenant_limits: Vec<TenantLimit>,
    pub client_read_timeout: Duration,
    pub ws_max_queued: usize,
    pub ws_max_queued_bytes: usize,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub max_http_connections: usize,
    pub admin_key: Option<AdminKey>,
    pub load_factor: f64,
    pub shutdown_grace: Duration,
    /// Mutual TLS on the edge's calls to workers (its client port stays plain HTTP).
    pub tls: Option<Tls>,
}

/// The operators' key; its `Debug` hides it.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminKey(pub String);

impl std::fmt::Debug for AdminKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminKey(..)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--auth keys needs at least one --api-key key=tenant")]
    NoKeys,
    #[error("--tenant-limit names tenant '{0}', which no --api-key maps to")]
    UnknownTenant(String),
    #[error("--admin-key must differ from every --api-key")]
    AdminKeyIsApiKey,
    #[error("{0}")]
    InvalidLimit(&'static str),
}

impl EdgeConfig {
    pub fn for_test() -> Self {
        EdgeConfig {
            auth: AuthMode::Open,
            api_keys: HashMap::new(),
            max_message_bytes: defaults::MAX_MESSAGE_BYTES,
            // smaller than the flags' defaults: a test that fills them stays quick
            max_connections: 1_000,
            max_in_flight: 1_000,
            ws_max_lifetime: defaults::duration(defaults::WS_MAX_LIFETIME),
            tenant_max_in_flight: None,
            tenant_max_connections: None,
            tenant_rate: None,
            tenant_burst: defaults::TENANT_BURST,
            tenant_limits: Vec::new(),
            client_read_timeout: defaults::duration(defaults::CLIENT_READ_TIMEOUT),
            ws_max_queued: defaults::WS_MAX_QUEUED,
            ws_max_queued_bytes: defaults::WS_MAX_QUEUED_BYTES,
            header_read_timeout: defaults::duration(defaults::HEADER_READ_TIMEOUT),
            body_read_timeout: defaults::duration(defaults::BODY_READ_TIMEOUT),
            max_http_connections: 1_000,
            admin_key: None,
            load_factor: defaults::LOAD_FACTOR,
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
        let api_keys: HashMap<String, String> = limits.api_keys.into_iter().collect();
        for limit in &limits.tenant_limits {
            let known = match auth {
                AuthMode::Open => limit.tenant == crate::auth::OPEN_TENANT,
                AuthMode::Keys => api_keys.values().any(|tenant| *tenant == limit.tenant),
            };
            if !known {
                return Err(ConfigError::UnknownTenant(limit.tenant.clone()));
            }
        }
        let rates = limits.tenant_rate.into_iter().chain(limits.tenant_limits.iter().filter_map(|l| match l.limit {
            TenantLimitKind::Rate(rate) => Some(rate),
            _ => None,
        }));
        if rates.into_iter().any(|rate| !(rate.is_finite() && rate > 0.0)) {
            return Err(ConfigError::InvalidLimit("a tenant rate must be a positive number of requests per second"));
        }
        let bursts =
            std::iter::once(limits.tenant_burst).chain(limits.tenant_limits.iter().filter_map(|l| match l.limit {
                TenantLimitKind::Burst(burst) => Some(burst),
                _ => None,
            }));
        if bursts.into_iter().any(|burst| burst == 0) {
            return Err(ConfigError::InvalidLimit("a tenant burst must be at least 1"));
        }
        if limits.max_http_connections == 0 || limits.ws_max_queued == 0 {
            return Err(ConfigError::InvalidLimit("--max-http-connections and --ws-max-queued must be at least 1"));
        }
        if let Some(admin) = &limits.admin_key
            && api_keys.contains_key(admin)
        {
            return Err(ConfigError::AdminKeyIsApiKey);
        }
        Ok(EdgeConfig {
            auth,
            api_keys,
            max_message_bytes: limits.max_message_bytes,
            max_connections: limits.max_connections,
            max_in_flight: limits.max_in_flight,
            ws_max_lifetime: limits.ws_max_lifetime,
            tenant_max_in_flight: limits.tenant_max_in_flight,
            tenant_max_connections: limits.tenant_max_connections,
            tenant_rate: limits.tenant_rate,
            tenant_burst: limits.tenant_burst,
            tenant_limits: limits.tenant_limits,
            client_read_timeout: limits.client_read_timeout,
            ws_max_queued: limits.ws_max_queued,
            ws_max_queued_bytes: limits.ws_max_queued_bytes,
            header_read_timeout: limits.header_read_timeout,
            body_read_timeout: limits.body_read_timeout,
            max_http_connections: limits.max_http_connections,
            admin_key: limits.admin_key.map(AdminKey),
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

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::{AuthMode, ConfigError, EdgeArgs, EdgeConfig, TenantLimit, TenantLimitKind};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        edge: EdgeArgs,
    }

    fn parse(args: &[&str]) -> Result<EdgeConfig, ConfigError> {
        let cli = Cli::try_parse_from(std::iter::once("edge").chain(args.iter().copied())).expect("parses");
        EdgeConfig::try_from(cli.edge)
    }

    #[test]
    fn limit_flags_parse_with_their_defaults() {
        Cli::command().debug_assert();
        let config = parse(&["--api-key", "sk-a=alpha,sk-b=beta"]).unwrap();
        assert_eq!(config.auth, AuthMode::Keys);
        assert_eq!((config.tenant_max_in_flight, config.tenant_rate, config.tenant_burst), (None, None, 200));
        assert_eq!((config.ws_max_queued, config.ws_max_queued_bytes), (64, 32 << 20));
        assert_eq!(config.client_read_timeout, std::time::Duration::from_secs(30));
        assert_eq!(config.header_read_timeout, std::time::Duration::from_secs(10));
        assert_eq!(config.body_read_timeout, std::time::Duration::from_secs(30));
        assert_eq!(config.max_http_connections, 10_000);
        assert!(config.admin_key.is_none());
        let config = parse(&[
            "--api-key",
            "sk-a=alpha",
            "--tenant-limit",
            "alpha:max-in-flight=3,alpha:rate=2.5",
            "--admin-key",
            "sk-op",
        ])
        .unwrap();
        assert_eq!(
            config.tenant_limits,
            [
                TenantLimit { tenant: "alpha".into(), limit: TenantLimitKind::MaxInFlight(3) },
                TenantLimit { tenant: "alpha".into(), limit: TenantLimitKind::Rate(2.5) },
            ]
        );
        assert_eq!(format!("{:?}", config.admin_key), "Some(AdminKey(..))", "the key is not printed");
    }

    #[test]
    fn bad_limits_are_refused() {
        assert!(Cli::try_parse_from(["edge", "--tenant-limit", "alpha:speed=3"]).is_err());
        assert!(Cli::try_parse_from(["edge", "--tenant-limit", "alpha:max-in-flight=many"]).is_err());
        assert!(matches!(
            parse(&["--api-key", "sk-a=alpha", "--tenant-limit", "gamma:rate=1"]),
            Err(ConfigError::UnknownTenant(_))
        ));
        assert!(matches!(
            parse(&["--api-key", "sk-a=alpha", "--tenant-burst", "0"]),
            Err(ConfigError::InvalidLimit(_))
        ));
        assert!(matches!(parse(&["--api-key", "sk-a=alpha", "--tenant-rate", "0"]), Err(ConfigError::InvalidLimit(_))));
        assert!(matches!(
            parse(&["--api-key", "sk-a=alpha", "--admin-key", "sk-a"]),
            Err(ConfigError::AdminKeyIsApiKey)
        ));
    }
}
