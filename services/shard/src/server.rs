//! `serve()`: register, serve gRPC and the operations endpoints, drain on shutdown.

use std::sync::Arc;

use tether_common::discovery::{Discovery, Member, NodeKind, membership};
use tether_common::ops::{self, Readiness};
use tether_common::serve::serve_internal;
use tether_proto::shard::v1::shard_server::ShardServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::ShardConfig;
use crate::engine::Engine;
use crate::engine::sim::SimEngine;
use crate::error::ShardError;
use crate::grpc::ShardService;
use crate::kv_cache::KvCache;
use crate::peers::{MAX_MESSAGE_BYTES, ShardPeers};

/// Serves a shard on `listener` until `shutdown`, registered in `discovery`.
pub async fn serve(
    config: ShardConfig,
    listener: TcpListener,
    discovery: Arc<dyn Discovery>,
    shutdown: CancellationToken,
) -> Result<(), ShardError> {
    // Install the recorder now: metrics recorded before the first scrape must count.
    tether_common::telemetry::prometheus();
    crate::metrics::describe();
    let local = listener.local_addr()?;
    let id = config.id.clone().unwrap_or_else(|| format!("shard-{}", local.port()));
    let scheme = tether_common::tls::scheme(config.tls.as_ref());
    let addr = config.advertise.clone().unwrap_or_else(|| format!("{scheme}://{local}"));
    let (engine, cache) = build_engine(&config).await?;
    let serving = Readiness::default();

    let engine_health = engine.clone();
    let service = ShardService::new(id.clone(), engine, cache, serving.clone());
    // Membership is followed through the hand-off, until `serve` returns.
    let peers_stop = CancellationToken::new();
    let _peers_guard = peers_stop.clone().drop_guard();
    let peers = ShardPeers::start(discovery.as_ref(), &id, config.tls.clone(), peers_stop);
    let router = tonic::service::Routes::new(
        ShardServer::new(service.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    )
    .into_axum_router()
    .merge(ops::router_with(serving.clone(), {
        // Ready only while the engine can take work (an engine server answering its probes).
        let engine = engine_health.clone();
        std::sync::Arc::new(move || engine.healthy())
    }));

    let stop_serving = CancellationToken::new();
    if config.in_memory_links {
        tether_common::link::publish_until(&addr, router.clone(), stop_serving.clone());
    }
    let server = tokio::spawn({
        let tls = config.tls.clone();
        let stop = stop_serving.clone();
        async move { serve_internal(listener, router, tls.as_ref(), stop).await }
    });
    let member = Member { id: id.clone(), addr: addr.clone() };
    // A lost lease fences the shard (no generation) until it is registered again.
    let Some(registration) =
        membership::hold(discovery.as_ref(), NodeKind::Shard, &member, &serving, &shutdown, || {}).await
    else {
        serving.set(false);
        stop_serving.cancel();
        return Ok(());
    };
    // One deadline for the whole drain. Stop taking turns, then, still registered so the ring
    // the peers compute still has this shard, hand each session to its owner without it: the
    // workers route there next once the lease is revoked. Then deregister and drain.
    let deadline = std::time::Instant::now() + config.shutdown_grace;
    serving.set(false);
    service.hand_off(&peers, deadline).await;
    registration.revoke().await;
    stop_serving.cancel();
    match tokio::time::timeout_at(deadline.into(), server).await {
        Ok(Ok(result)) => result.map_err(ShardError::Io),
        Ok(Err(join)) => Err(ShardError::Io(std::io::Error::other(join))),
        Err(_) => Err(ShardError::ShutdownDeadline),
    }
}

/// Builds the configured engine and the KV-cache bookkeeping in front of it.
async fn build_engine(config: &ShardConfig) -> Result<(Arc<dyn Engine>, Arc<KvCache>), ShardError> {
    if let Some(openai) = config.openai.clone() {
        let path = openai.vocabulary.clone().ok_or_else(|| {
            ShardError::Engine("--engine openai needs --openai-vocabulary (the served model's GGUF file)".into())
        })?;
        let vocabulary = tokio::task::spawn_blocking(move || crate::engine::openai::vocabulary::load(&path))
            .await
            .map_err(|join| ShardError::Engine(join.to_string()))??;
        let engine = crate::engine::openai::OpenAiEngine::start(openai, vocabulary).await?;
        // No shared prefixes: the upstream server keeps (and reports) its own prefix cache;
        // the bookkeeping only says which prefix a session sent before.
        return Ok((Arc::new(engine), Arc::new(KvCache::new(config.cache_tokens))));
    }
    let Some(llama) = config.llama.clone() else {
        // The sim's cache is bookkeeping and a prefill cost: any session's prefix serves.
        let cache = KvCache::new(config.cache_tokens).with_shared_prefixes(config.cache_block_tokens);
        return Ok((Arc::new(SimEngine::new(config.sim.clone())), Arc::new(cache)));
    };
    #[cfg(feature = "llama")]
    {
        // The llama engine holds at most its context: the bookkeeping's budget says the same,
        // and a session the engine evicts is dropped from the bookkeeping too. No shared
        // prefixes: the engine keeps one llama.cpp sequence per session and a turn reuses only
        // its own session's cells (sharing would mean copying cells between sequences).
        let cache = Arc::new(KvCache::new(u64::from(llama.context_tokens)));
        let evicted = cache.clone();
        let on_evict = Box::new(move |session: u64| {
            evicted.drop_session(session);
        });
        let engine = tokio::task::spawn_blocking(move || crate::engine::llama::LlamaEngine::start(llama, on_evict))
            .await
            .map_err(|join| ShardError::Engine(join.to_string()))??;
        Ok((Arc::new(engine), cache))
    }
    #[cfg(not(feature = "llama"))]
    {
        Err(ShardError::Engine(format!(
            "--engine llama (model {}): this build has no llama engine; rebuild with `--features llama`",
            llama.model_path.display()
        )))
    }
}
