//! Subcommands and their mapping to the services' `serve()` functions.

use std::sync::Arc;

use clap::{Parser, Subcommand};
use tether_common::config::CommonArgs;
use tether_common::discovery::Discovery;
use tether_common::discovery::fixed::FixedDiscovery;
use tether_common::serve::bind;
use tether_common::shutdown;
use tether_common::telemetry::{LogFormat, TelemetryConfig};
use tether_common::tls::{Tls, check_url};

#[derive(Debug, Parser)]
#[command(name = "tether", version, about = "A distributed, stateful inference router for agent loops")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the Responses API (HTTP, SSE and WebSocket) and route sessions to workers.
    Edge(tether_edge::EdgeArgs),
    /// Hold sessions and run the per-turn pipeline.
    Worker(tether_worker::WorkerArgs),
    /// Run an inference engine with a per-session KV cache.
    Shard(tether_shard::ShardArgs),
    /// Run a whole cluster in this process: edge, 3 workers, 2 sim shards.
    Dev(crate::dev::DevArgs),
    /// Make a dev CA (or reuse one) and node certificates for mutual TLS between nodes.
    Certs(crate::certs::CertsArgs),
    /// Print the operator view of a running cluster (what /dashboard shows) as tables.
    Status(crate::status::StatusArgs),
}

impl Command {
    /// Logging and span export for the whole process; the service name is OpenTelemetry's
    /// `service.name` (`tether` for dev, where spans say their node in `node`).
    pub fn telemetry(&self) -> TelemetryConfig {
        let (log_format, otlp_endpoint, service_name) = match self {
            Command::Edge(args) => (args.common.log_format, args.common.otlp_endpoint.clone(), "tether-edge"),
            Command::Worker(args) => (args.common.log_format, args.common.otlp_endpoint.clone(), "tether-worker"),
            Command::Shard(args) => (args.common.log_format, args.common.otlp_endpoint.clone(), "tether-shard"),
            Command::Dev(args) => (args.log_format, args.otlp_endpoint.clone(), "tether"),
            Command::Certs(_) | Command::Status(_) => (LogFormat::Plain, None, "tether"),
        };
        // An empty variable (compose's `${TETHER_OTLP_ENDPOINT:-}`) means no exporter.
        let otlp_endpoint = otlp_endpoint.filter(|endpoint| !endpoint.trim().is_empty());
        TelemetryConfig { log_format, otlp_endpoint, service_name: service_name.to_owned() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("could not listen: {0}")]
    Bind(std::io::Error),
    #[error("shutdown deadline exceeded")]
    ShutdownDeadline,
    #[error("{0}")]
    Service(String),
}

pub fn exit_code(error: &CliError) -> u8 {
    match error {
        CliError::Config(_) => 64,
        CliError::ShutdownDeadline => 70,
        CliError::Bind(_) | CliError::Service(_) => 1,
    }
}

/// Loads the internal plane's TLS files (all three or none) and checks that every address
/// this node is given speaks the plane's scheme: `https://` with TLS, `http://` without.
fn tls(common: &CommonArgs, advertise: Option<&str>) -> Result<Option<Tls>, CliError> {
    let tls = common.tls.load().map_err(|e| CliError::Config(e.to_string()))?;
    let peers = common.membership.workers.iter().chain(&common.membership.shards).map(|m| m.addr.as_str());
    for addr in peers.chain(advertise) {
        check_url(addr, tls.as_ref()).map_err(|e| CliError::Config(e.to_string()))?;
    }
    if tls.is_some() {
        tracing::info!("internal plane: mutual TLS");
    }
    Ok(tls)
}

/// Chooses membership: etcd when `--etcd` endpoints are given, else the fixed peer lists.
async fn discovery(common: &CommonArgs) -> Result<Arc<dyn Discovery>, CliError> {
    let membership = &common.membership;
    if membership.etcd_endpoints.is_empty() {
        return Ok(Arc::new(FixedDiscovery::new(membership.workers.clone(), membership.shards.clone())));
    }
    #[cfg(feature = "etcd")]
    {
        let (endpoints, cluster, ttl) = (&membership.etcd_endpoints, &membership.cluster, membership.lease_ttl);
        let etcd = tether_common::discovery::etcd::EtcdDiscovery::connect(endpoints, cluster, ttl)
            .await
            .map_err(|e| CliError::Config(e.to_string()))?;
        tracing::info!(?endpoints, cluster, lease_ttl = ?ttl, "membership in etcd");
        Ok(Arc::new(etcd))
    }
    #[cfg(not(feature = "etcd"))]
    Err(CliError::Config("--etcd given, but this binary was built without the `etcd` feature".into()))
}

pub async fn run(cli: Cli) -> Result<(), CliError> {
    let shutdown = shutdown::signal();
    match cli.command {
        Command::Edge(args) => {
            let tls = tls(&args.common, None)?;
            let discovery = discovery(&args.common).await?;
            let listener = bind(args.listen).await.map_err(CliError::Bind)?;
            let mut config = tether_edge::EdgeConfig::try_from(args).map_err(|e| CliError::Config(e.to_string()))?;
            config.tls = tls;
            tracing::info!(addr = %listener.local_addr().map_err(CliError::Bind)?, "edge listening");
            tether_edge::serve(config, listener, discovery, shutdown).await.map_err(|e| match e {
                tether_edge::EdgeError::ShutdownDeadline => CliError::ShutdownDeadline,
                other => CliError::Service(other.to_string()),
            })
        }
        Command::Worker(args) => {
            let tls = tls(&args.common, args.advertise.as_deref())?;
            let discovery = discovery(&args.common).await?;
            let listener = bind(args.listen).await.map_err(CliError::Bind)?;
            tracing::info!(addr = %listener.local_addr().map_err(CliError::Bind)?, "worker listening");
            let config = tether_worker::WorkerConfig { tls, ..args.into() };
            tether_worker::serve(config, listener, discovery, shutdown).await.map_err(|e| match e {
                tether_worker::WorkerError::ShutdownDeadline => CliError::ShutdownDeadline,
                other => CliError::Service(other.to_string()),
            })
        }
        Command::Shard(args) => {
            let tls = tls(&args.common, args.advertise.as_deref())?;
            let discovery = discovery(&args.common).await?;
            let listener = bind(args.listen).await.map_err(CliError::Bind)?;
            tracing::info!(addr = %listener.local_addr().map_err(CliError::Bind)?, "shard listening");
            let config = tether_shard::ShardConfig { tls, ..args.into() };
            tether_shard::serve(config, listener, discovery, shutdown).await.map_err(|e| match e {
                tether_shard::ShardError::ShutdownDeadline => CliError::ShutdownDeadline,
                other => CliError::Service(other.to_string()),
            })
        }
        Command::Dev(args) => crate::dev::run(args, shutdown).await,
        Command::Certs(args) => crate::certs::run(&args),
        Command::Status(args) => crate::status::run(&args, shutdown).await,
    }
}
