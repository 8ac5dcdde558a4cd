//! `serve()`: register, serve gRPC and the operations endpoints, drain on shutdown.

use std::sync::Arc;

use tether_common::discovery::{Discovery, Member, NodeKind, membership};
use tether_common::ops::{self, Readiness};
use tether_common::serve::serve_internal;
use tether_proto::worker::v1::worker_server::WorkerServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::budget::PrefillBudget;
use crate::config::WorkerConfig;
use crate::context::WorkerContext;
use crate::error::WorkerError;
use crate::grpc::WorkerService;
use crate::peers::Peers;
use crate::replication::hand_off;
use crate::safety::PatternClassifier;
use crate::session::{HeldPrompts, SessionCache};
use crate::shard_pool::{ShardConnector, ShardPool, grpc_connector};
use crate::tokenizer::Renderers;

/// Serves a worker on `listener` until `shutdown`, registered in `discovery`.
pub async fn serve(
    config: WorkerConfig,
    listener: TcpListener,
    discovery: Arc<dyn Discovery>,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    let connector = grpc_connector(config.tls.clone());
    serve_with(config, listener, discovery, connector, shutdown).await
}

/// [`serve`] with a chosen shard connector (tests wrap shards with faults).
pub async fn serve_with(
    config: WorkerConfig,
    listener: TcpListener,
    discovery: Arc<dyn Discovery>,
    connector: ShardConnector,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    tether_common::telemetry::prometheus();
    crate::metrics::describe();
    tether_common::pause::watch();
    let local = listener.local_addr()?;
    let id = config.id.clone().unwrap_or_else(|| format!("worker-{}", local.port()));
    let scheme = tether_common::tls::scheme(config.tls.as_ref());
    let addr = config.advertise.clone().unwrap_or_else(|| format!("{scheme}://{local}"));
    let renderer = Renderers::load(&config.llama_models)?;
    let stop = CancellationToken::new();
    let serving = Readiness::default();
    let ctx = Arc::new(WorkerContext {
        id: id.clone(),
        cache: SessionCache::new(config.cache),
        held: HeldPrompts::new(config.stateless_held_tokens),
        shards: ShardPool::start(discovery.as_ref(), connector, stop.clone()).with_placement(config.shard_placement),
        renderer,
        classifier: Arc::new(PatternClassifier::with_defaults(&config.safety_patterns)),
        default_model: config.default_model.clone(),
        serving: serving.clone(),
        peers: Peers::start(discovery.as_ref(), &id, config.tls.clone(), stop.clone()),
        replication: config.replication,
        prefill_budget: PrefillBudget::new(config.prefill_limit),
        in_flight: Default::default(),
        stats: Default::default(),
    });
    let service = WorkerServer::new(WorkerService::new(ctx.clone()))
        .max_decoding_message_size(256 << 20)
        .max_encoding_message_size(256 << 20);
    let router = tonic::service::Routes::new(service).into_axum_router().merge(ops::router(serving.clone()));
    let stop_accepting = CancellationToken::new();
    if config.in_memory_links {
        tether_common::link::publish_until(&addr, router.clone(), stop_accepting.clone());
    }
    let server = tokio::spawn({
        let tls = config.tls.clone();
        let stop = stop_accepting.clone();
        async move { serve_internal(listener, router, tls.as_ref(), stop).await }
    });
    let member = Member { id: id.clone(), addr: addr.clone() };
    // Serve until shutdown; a lost lease fences the worker (no turns) until re-registered.
    let fenced = || {
        metrics::counter!(crate::metrics::FENCED).increment(1);
        ctx.stats.fenced();
    };
    let Some(registration) =
        membership::hold(discovery.as_ref(), NodeKind::Worker, &member, &serving, &shutdown, fenced).await
    else {
        // Shutdown came before the first registration.
        serving.set(false);
        stop_accepting.cancel();
        stop.cancel();
        return Ok(());
    };

    // Drain under one deadline: refuse new turns (the edge retries them on the new owner),
    // hand sessions over, deregister, finish in-flight turns.
    // The lease is revoked only after the hand-off: until then this worker stays on everyone's
    // ring, so a new owner that misses a state pulls it from here.
    let deadline = tokio::time::Instant::now() + config.shutdown_grace;
    serving.set(false);
    ctx.stats.set_draining();
    match tokio::time::timeout_at(deadline, hand_off(&ctx)).await {
        Ok(moved) => tracing::info!(worker = %id, handed_off = moved, "sessions handed off"),
        Err(_) => tracing::warn!(worker = %id, "hand-off ran out of the shutdown grace"),
    }
    registration.revoke().await;
    stop_accepting.cancel();
    let drained = tokio::time::timeout_at(deadline, server).await;
    stop.cancel();
    match drained {
        Ok(Ok(result)) => result.map_err(WorkerError::Io),
        Ok(Err(join)) => Err(WorkerError::Io(std::io::Error::other(join))),
        Err(_) => Err(WorkerError::ShutdownDeadline),
    }
}
