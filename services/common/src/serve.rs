//! Serving an axum router (HTTP/1.1 and HTTP/2, so gRPC too) on a pre-bound listener.
//!
//! Every accepted socket gets TCP_NODELAY: without it Nagle plus delayed ACKs add ~40 ms to
//! each streamed gRPC reply and WebSocket frame.

use std::net::SocketAddr;

use axum::Router;
use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Binds a TCP listener; an address with port 0 gets an ephemeral port.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves `router` until `shutdown` is cancelled, then stops accepting and waits for open
/// connections to finish (the caller bounds that wait with its one shutdown deadline).
pub async fn serve_router(listener: TcpListener, router: Router, shutdown: CancellationToken) -> std::io::Result<()> {
    let listener = listener.tap_io(|stream| {
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "set TCP_NODELAY failed");
        }
    });
    axum::serve(listener, router.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}
