//! Command-line arguments every service shares.

use std::time::Duration;

use clap::Args;

use crate::discovery::Member;
use crate::discovery::fixed::parse_member;
use crate::telemetry::LogFormat;
use crate::tls::TlsArgs;

#[derive(Clone, Debug, Args)]
pub struct CommonArgs {
    /// Log format on stderr.
    #[arg(long, env = "TETHER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain, help_heading = "Common")]
    pub log_format: LogFormat,

    /// Export each turn's spans over OTLP/gRPC to this collector, e.g. `http://127.0.0.1:4317`.
    /// Unset: no exporter runs (trace ids still propagate and appear in JSON logs).
    #[arg(long, env = "TETHER_OTLP_ENDPOINT", help_heading = "Common")]
    pub otlp_endpoint: Option<String>,

    /// One deadline for a graceful shutdown: drain in-flight work, then exit.
    #[arg(long, env = "TETHER_SHUTDOWN_GRACE", value_parser = humantime::parse_duration, default_value = "10s", help_heading = "Common")]
    pub shutdown_grace: Duration,

    #[command(flatten)]
    pub membership: MembershipArgs,

    #[command(flatten)]
    pub tls: TlsArgs,
}

/// Where membership comes from: etcd when endpoints are given, else the fixed peer lists.
#[derive(Clone, Debug, Args)]
pub struct MembershipArgs {
    /// etcd endpoints, e.g. `http://127.0.0.1:2379` (comma separated).
    #[arg(long = "etcd", env = "TETHER_ETCD_ENDPOINTS", value_delimiter = ',', help_heading = "Membership")]
    pub etcd_endpoints: Vec<String>,

    /// Cluster name: keys live under `/tether/<cluster>/`.
    #[arg(long, env = "TETHER_CLUSTER", default_value = "default", help_heading = "Membership")]
    pub cluster: String,

    /// Lease time to live of a registration; a node that stops renewing drops out after it.
    #[arg(long, env = "TETHER_LEASE_TTL", value_parser = humantime::parse_duration, default_value = "3s", help_heading = "Membership")]
    pub lease_ttl: Duration,

    /// Fixed workers as `id=http://host:port` (comma separated), when not using etcd.
    #[arg(long = "worker-peer", env = "TETHER_WORKER_PEERS", value_delimiter = ',', value_parser = parse_member, help_heading = "Membership")]
    pub workers: Vec<Member>,

    /// Fixed shards as `id=http://host:port` (comma separated), when not using etcd.
    #[arg(long = "shard-peer", env = "TETHER_SHARD_PEERS", value_delimiter = ',', value_parser = parse_member, help_heading = "Membership")]
    pub shards: Vec<Member>,
}
