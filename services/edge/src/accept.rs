//! Accepting the edge's public HTTP connections, with the limits a public port needs.
//!
//! `axum::serve` gives hyper no timer, so hyper's HTTP/1.1 header read timeout never fires and
//! a client that sends half a header (slowloris) holds its connection forever. Here hyper-util's
//! server runs with a tokio timer and `--header-read-timeout` (which also bounds an idle
//! keep-alive connection: hyper starts it whenever it waits for a request head), and at most
//! `--max-http-connections` connections are open at once: past it a new connection gets a
//! `503` and is closed at once, so a client learns to retry instead of hanging in the backlog.
//! A connection upgraded to WebSocket leaves this count (its connection task ends) and is
//! bounded by the WebSocket limits instead.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_util::sync::CancellationToken;

use crate::metrics as m;

/// The limits of the HTTP server.
#[derive(Clone, Copy, Debug)]
pub struct HttpLimits {
    pub header_read_timeout: Duration,
    pub max_connections: usize,
}

/// An open connection: its permit and its place in the gauge.
struct OpenConnection(#[allow(dead_code, reason = "held for its drop")] OwnedSemaphorePermit);

impl OpenConnection {
    fn new(permit: OwnedSemaphorePermit) -> Self {
        metrics::gauge!(m::HTTP_CONNECTIONS).increment(1.0);
        OpenConnection(permit)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        metrics::gauge!(m::HTTP_CONNECTIONS).decrement(1.0);
    }
}

/// The reply to a connection past the cap, written without reading the request.
fn overloaded_reply() -> Vec<u8> {
    let body = r#"{"error":{"message":"Too many connections to this server. Retry shortly.","type":"server_error","param":null,"code":"server_overloaded"}}"#;
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nx-should-retry: true\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Serves `router` on `listener` until `shutdown`, then stops accepting, lets each connection
/// finish its request in progress and waits for them (the caller bounds that wait).
pub async fn serve_http(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    // CONNECT protocol needed for HTTP/2 WebSockets (as axum::serve sets it).
    builder.http2().enable_connect_protocol();
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let overloaded = overloaded_reply();
    // Every connection task holds a receiver; `closed()` resolves when all are gone.
    let (all_closed, open) = watch::channel(());
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            metrics::counter!(m::HTTP_CONNECTIONS_REFUSED).increment(1);
            let _ = stream.try_write(&overloaded);
            continue;
        };
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "set TCP_NODELAY failed");
        }
        let open_connection = OpenConnection::new(permit);
        let service = TowerToHyperService::new(router.clone());
        let builder = builder.clone();
        let shutdown = shutdown.clone();
        let open = open.clone();
        tokio::spawn(async move {
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(error) = result {
                        tracing::trace!(%error, "http connection ended with an error");
                    }
                }
                _ = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
            drop(open_connection);
            drop(open);
        });
    }
    drop(open);
    all_closed.closed().await;
    Ok(())
}
