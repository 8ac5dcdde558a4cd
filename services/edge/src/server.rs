//! `serve()`: follow membership, serve the API, drain on shutdown under one deadline.

use std::sync::Arc;
use std::time::Duration;

use tether_common::discovery::{Discovery, NodeKind};
use tether_common::ops::Readiness;
use tether_proto::worker::v1::ListModelsRequest;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::accept::{HttpLimits, serve_http};
use crate::app::router;
use crate::config::EdgeConfig;
use crate::error::EdgeError;
use crate::state::EdgeState;
use crate::workers::WorkerPool;

/// Serves an edge on `listener` until `shutdown`.
pub async fn serve(
    config: EdgeConfig,
    listener: TcpListener,
    discovery: Arc<dyn Discovery>,
    shutdown: CancellationToken,
) -> Result<(), EdgeError> {
    // Install the recorder now: metrics recorded before the first scrape must count.
    tether_common::telemetry::prometheus();
    crate::metrics::describe();
    let stop = CancellationToken::new();
    let readiness = Readiness::default();
    let workers = WorkerPool::start(discovery.as_ref(), config.load_factor, config.tls.clone(), stop.clone());
    let state = EdgeState::new(config.clone(), workers.clone(), discovery.watch(NodeKind::Shard), readiness.clone());
    let limits =
        HttpLimits { header_read_timeout: config.header_read_timeout, max_connections: config.max_http_connections };
    let server = tokio::spawn(serve_http(listener, router(state.clone()), limits, stop.clone()));
    tokio::spawn(become_ready(workers, readiness.clone(), stop.clone()));

    shutdown.cancelled().await;
    tracing::info!("edge draining");
    readiness.set(false);
    // WebSockets close at their next idle moment; HTTP stops accepting and finishes.
    state.draining.cancel();
    stop.cancel();
    let drained = async {
        let served = server.await;
        // Every open WebSocket holds a permit; all back means all closed.
        let _all = state.admission.connections.acquire_many(config.max_connections as u32).await;
        served
    };
    match tokio::time::timeout(config.shutdown_grace, drained).await {
        Ok(Ok(result)) => result.map_err(EdgeError::Io),
        Ok(Err(join)) => Err(EdgeError::Io(std::io::Error::other(join))),
        Err(_) => Err(EdgeError::ShutdownDeadline),
    }
}

/// Marks the edge ready once a worker answers with at least one model it can serve.
async fn become_ready(workers: WorkerPool, readiness: Readiness, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_millis(25));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(worker) = workers.any() else { continue };
        if let Ok(reply) = worker.client.clone().list_models(ListModelsRequest {}).await
            && !reply.into_inner().models.is_empty()
        {
            readiness.set(true);
            tracing::info!("edge ready");
            return;
        }
    }
}
