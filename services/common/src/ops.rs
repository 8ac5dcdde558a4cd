//! The operations endpoints every service answers: `/healthz`, `/readyz`, `/health` and
//! `/metrics`. `/health` is the name peer routers probe (vLLM's and SGLang's routers mark a
//! backend usable on its 200): it answers as `/readyz` does, so a draining node stops receiving
//! their traffic.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;

/// Whether a service can take work; flipped on once it serves and off when it drains.
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// A further condition of readiness (a shard's engine server answering its health checks).
pub type ReadyCheck = Arc<dyn Fn() -> bool + Send + Sync>;

/// Returns the router of the operations endpoints.
pub fn router(readiness: Readiness) -> Router {
    router_with(readiness, Arc::new(|| true))
}

/// Returns the router of the operations endpoints; `/readyz` and `/health` also need `check`.
pub fn router_with(readiness: Readiness, check: ReadyCheck) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/health", get(readyz))
        .route("/metrics", get(|| async { crate::telemetry::prometheus().render() }))
        .with_state((readiness, check))
}

async fn readyz(State((readiness, check)): State<(Readiness, ReadyCheck)>) -> impl IntoResponse {
    if readiness.is_ready() && check() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use tower::ServiceExt;

    use super::{Readiness, router};

    async fn status(readiness: &Readiness, path: &str) -> StatusCode {
        let request = Request::get(path).body(Body::empty()).unwrap();
        router(readiness.clone()).oneshot(request).await.unwrap().status()
    }

    #[tokio::test]
    async fn health_follows_readiness_for_peer_routers() {
        let readiness = Readiness::default();
        assert_eq!(status(&readiness, "/health").await, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(status(&readiness, "/healthz").await, StatusCode::OK);
        readiness.set(true);
        assert_eq!(status(&readiness, "/health").await, StatusCode::OK);
        assert_eq!(status(&readiness, "/readyz").await, StatusCode::OK);
        readiness.set(false); // draining
        assert_eq!(status(&readiness, "/health").await, StatusCode::SERVICE_UNAVAILABLE);
    }
}
