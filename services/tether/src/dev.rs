//! `tether dev`: the embedded single-process cluster (edge, 3 workers, 2 sim shards) with
//! in-memory membership. Only the edge's port faces clients; workers and shards listen on
//! ephemeral loopback ports, and call each other's gRPC services in memory (`--links memory`,
//! see `tether_common::link`) or over those ports (`--links tcp`).

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use tether_common::discovery::Discovery;
use tether_common::discovery::memory::MemoryDiscovery;
use tether_common::serve::bind;
use tether_common::telemetry::LogFormat;
use tether_common::tls::{Authority, Tls};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::cli::CliError;

#[derive(Debug, Args)]
pub struct DevArgs {
    /// Address of the Responses API (`:0` picks a free port; the chosen one is printed).
    #[arg(long, env = "TETHER_DEV_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Number of workers.
    #[arg(long, env = "TETHER_DEV_WORKERS", default_value_t = 3)]
    pub workers: usize,

    /// Number of sim shards.
    #[arg(long, env = "TETHER_DEV_SHARDS", default_value_t = 2)]
    pub shards: usize,

    #[command(flatten)]
    pub limits: tether_edge::config::EdgeLimitArgs,

    #[command(flatten)]
    pub sim: tether_shard::config::SimArgs,

    /// `--engine llama --model PATH` runs the shards on a real model (use `--shards 1`);
    /// `--engine openai --model NAME --upstream URL[,URL..] --openai-vocabulary GGUF` fronts
    /// OpenAI-compatible servers (with as many upstreams as shards, shard i fronts the i-th).
    #[command(flatten)]
    pub engine: tether_shard::config::EngineArgs,

    /// How the workers pick a turn's shard: the session's owner, or round-robin (the
    /// affinity benchmark's baseline).
    #[arg(long, env = "TETHER_WORKER_SHARD_PLACEMENT", value_enum, default_value_t = tether_worker::shard_pool::ShardPlacement::Affinity)]
    pub shard_placement: tether_worker::shard_pool::ShardPlacement,

    /// When a completed stored response is copied to its ring successor: before its terminal
    /// event (`sync`: a client that saw `completed` can continue after its worker dies),
    /// after it (`async`), or never (`off`).
    #[arg(long, env = "TETHER_WORKER_REPLICATION", value_enum, default_value_t = tether_worker::config::ReplicationMode::Sync)]
    pub replication: tether_worker::config::ReplicationMode,

    #[arg(long, env = "TETHER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain)]
    pub log_format: LogFormat,

    /// Export each turn's spans (edge, workers and shards alike) over OTLP/gRPC to this
    /// collector, e.g. `http://127.0.0.1:4317`. Unset: no exporter runs.
    #[arg(long, env = "TETHER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// One deadline for a graceful shutdown.
    #[arg(long, env = "TETHER_SHUTDOWN_GRACE", value_parser = humantime::parse_duration, default_value = "10s")]
    pub shutdown_grace: Duration,

    /// How the nodes reach each other: `memory` calls the node's gRPC service inside this
    /// process (the same service, codec and statuses, without sockets and HTTP/2 framing);
    /// `tcp` over loopback, as separate processes do. `--tls` implies `tcp`.
    #[arg(long, env = "TETHER_DEV_LINKS", value_enum, default_value_t = Links::Memory)]
    pub links: Links,

    /// Mutual TLS between the nodes too (a CA and certificates made in memory at start); the
    /// internal plane is plaintext on loopback otherwise. The Responses API stays plain HTTP.
    #[arg(long, env = "TETHER_DEV_TLS")]
    pub tls: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Links {
    Memory,
    Tcp,
}

pub async fn run(args: DevArgs, shutdown: CancellationToken) -> Result<(), CliError> {
    if let Some(llama) = args.engine.llama().filter(|llama| !llama.model_path.is_file()) {
        // Fail before serving: nodes that fail later would leave the edge up with no shard.
        return Err(CliError::Config(format!(
            "--model {}: no such file (scripts/fetch-model.sh)",
            llama.model_path.display()
        )));
    }
    if let Some(openai) = args.engine.openai() {
        match openai.vocabulary {
            Some(path) if path.is_file() => {}
            Some(path) => {
                return Err(CliError::Config(format!("--openai-vocabulary {}: no such file", path.display())));
            }
            None => {
                return Err(CliError::Config(
                    "--engine openai needs --openai-vocabulary (the served model's GGUF file)".into(),
                ));
            }
        }
    }
    let authority = match args.tls {
        true => Some(Authority::generate().map_err(|e| CliError::Config(e.to_string()))?),
        false => None,
    };
    let node_tls = |id: &str| -> Result<Option<Tls>, CliError> {
        let sans = ["localhost".to_owned(), "127.0.0.1".to_owned()];
        authority.as_ref().map(|ca| ca.node_tls(id, &sans)).transpose().map_err(|e| CliError::Config(e.to_string()))
    };
    let in_memory_links = args.links == Links::Memory && !args.tls;
    let discovery: Arc<dyn Discovery> = Arc::new(MemoryDiscovery::new());
    let internal = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let mut nodes = JoinSet::new();
    for index in 0..args.shards {
        let listener = bind(internal).await.map_err(CliError::Bind)?;
        let mut config = tether_shard::ShardConfig::from_engine(args.sim.clone(), &args.engine, args.shutdown_grace);
        config.id = Some(format!("shard-{index}"));
        config.tls = node_tls(&format!("shard-{index}"))?;
        config.in_memory_links = in_memory_links;
        if let (Some(llama), None) = (config.llama.as_mut(), args.engine.threads) {
            llama.threads = (llama.threads / args.shards.max(1) as u32).max(1); // share the cores
        }
        if let Some(openai) = config.openai.as_mut().filter(|openai| openai.upstreams.len() == args.shards) {
            openai.upstreams = vec![openai.upstreams[index].clone()];
        }
        let (discovery, shutdown) = (discovery.clone(), shutdown.clone());
        nodes.spawn(async move {
            tether_shard::serve(config, listener, discovery, shutdown).await.map_err(|e| e.to_string())
        });
    }
    for index in 0..args.workers {
        let listener = bind(internal).await.map_err(CliError::Bind)?;
        let mut config = tether_worker::WorkerConfig::for_test();
        config.id = Some(format!("worker-{index}"));
        config.tls = node_tls(&format!("worker-{index}"))?;
        config.in_memory_links = in_memory_links;
        config.shutdown_grace = args.shutdown_grace;
        config.shard_placement = args.shard_placement;
        config.replication = args.replication;
        if let Some(llama) = args.engine.llama() {
            config.default_model = llama.model_name.clone();
            config.llama_models = vec![(llama.model_name, llama.model_path)];
        }
        // The worker renders with the served model's vocabulary, as the shard reads it.
        if let Some(openai) = args.engine.openai() {
            config.default_model = openai.model_name.clone();
            config.llama_models = openai.vocabulary.map(|path| (openai.model_name, path)).into_iter().collect();
        }
        let (discovery, shutdown) = (discovery.clone(), shutdown.clone());
        nodes.spawn(async move {
            tether_worker::serve(config, listener, discovery, shutdown).await.map_err(|e| e.to_string())
        });
    }
    let mut edge_config =
        tether_edge::EdgeConfig::from_limits(args.limits, args.shutdown_grace, tether_edge::config::AuthMode::Open)
            .map_err(|e| CliError::Config(e.to_string()))?;
    edge_config.tls = node_tls("edge")?;
    let listener = bind(args.listen).await.map_err(CliError::Bind)?;
    let addr = listener.local_addr().map_err(CliError::Bind)?;
    tracing::info!(%addr, workers = args.workers, shards = args.shards, "tether dev listening");
    // A stable line on stdout for scripts and tests to find the port.
    println!("tether listening on http://{addr}");
    let _ = std::io::stdout().flush();
    let edge = tether_edge::serve(edge_config, listener, discovery, shutdown.clone());
    let edge_result = edge.await;
    let mut failures = Vec::new();
    while let Some(result) = nodes.join_next().await {
        if let Ok(Err(error)) = result {
            failures.push(error);
        }
    }
    match edge_result {
        Err(tether_edge::EdgeError::ShutdownDeadline) => Err(CliError::ShutdownDeadline),
        Err(error) => Err(CliError::Service(error.to_string())),
        Ok(()) if failures.is_empty() => Ok(()),
        Ok(()) => Err(CliError::Service(failures.join("; "))),
    }
}
