//! Serving an axum router (HTTP/1.1 and HTTP/2, so gRPC too) on a pre-bound listener, and
//! the internal plane's variant with mutual TLS.
//!
//! Every accepted socket gets TCP_NODELAY: without it Nagle plus delayed ACKs add ~40 ms to
//! each streamed gRPC reply and WebSocket frame.

use std::net::SocketAddr;

use axum::Router;
use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::tls::Tls;

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

/// Serves a worker's or shard's router (gRPC plus `/healthz`, `/readyz`, `/metrics`) until
/// `shutdown`. With `tls`, every connection is mutual TLS: tonic's server with the node's
/// identity and `client_ca_root`, so a client without a certificate from the cluster CA fails
/// the handshake and reaches nothing on this port, the operations endpoints included (probes
/// present a node certificate too: one port, one rule). HTTP/2 only then (ALPN `h2`: gRPC
/// clients and `curl` both speak it). Without `tls`, [`serve_router`].
pub async fn serve_internal(
    listener: TcpListener,
    router: Router,
    tls: Option<&Tls>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let Some(tls) = tls else {
        return serve_router(listener, router, shutdown).await;
    };
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .tls_config(tls.server_config())
        .map_err(std::io::Error::other)?
        .add_routes(tonic::service::Routes::from(router))
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await
        .map_err(std::io::Error::other)
}
