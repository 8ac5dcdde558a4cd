//! How a node reaches another node: a [`Link`] is the transport under a tonic client.
//!
//! Across processes it is a gRPC channel over TCP (HTTP/2, keep-alives, optional mutual TLS:
//! [`crate::nodes::channel`]). Between nodes of one process that opted in (`tether dev`), it is
//! the serving node's own router called in memory: the same gRPC service, codec, metadata and
//! status codes, without HTTP/2 framing, loopback sockets and their system calls, which were
//! the largest part of the router's CPU per streamed token (see `loadtest/profiles/`).
//!
//! A node opts in by [`publish`]ing its router under the address it advertises. Links are made
//! when a node learns of a member ([`connect`]): a published address gets the in-memory link,
//! any other the TCP channel. A node that stops accepting [`LocalNode::close`]s its entry:
//! new calls through existing links then fail `UNAVAILABLE`, as a closed port refuses them, while
//! calls already running finish, as a draining server lets them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};

use axum::Router;
use parking_lot::RwLock;
use tower::util::BoxCloneSyncService;
use tower::{BoxError, ServiceExt};

use crate::tls::Tls;

/// The transport under every internal tonic client.
pub type Link = BoxCloneSyncService<http::Request<tonic::body::Body>, http::Response<tonic::body::Body>, LinkError>;

/// A transport failure (the channel's error). A named type, not a bare `BoxError`: tonic's
/// client futures must convert it to `Status` for every lifetime, which a boxed trait object
/// of an unnamed lifetime cannot prove. tonic reads the cause (`source`) for the status code.
#[derive(Debug)]
pub struct LinkError(BoxError);

impl std::fmt::Display for LinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for LinkError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.0.as_ref())
    }
}

struct Entry {
    router: Router,
    open: Arc<AtomicBool>,
}

/// Routers of this process's nodes that accept in-memory calls, by advertised address.
static LOCAL: LazyLock<RwLock<HashMap<String, Entry>>> = LazyLock::new(Default::default);

/// A node's entry in this process's in-memory links; dropping it removes the entry.
#[must_use = "the entry is removed when this is dropped"]
pub struct LocalNode {
    addr: String,
    open: Arc<AtomicBool>,
}

impl LocalNode {
    /// The node stopped accepting: later calls fail `UNAVAILABLE`; running ones go on.
    pub fn close(&self) {
        self.open.store(false, Ordering::Release);
    }
}

impl Drop for LocalNode {
    fn drop(&mut self) {
        self.close();
        let mut local = LOCAL.write();
        if local.get(&self.addr).is_some_and(|entry| Arc::ptr_eq(&entry.open, &self.open)) {
            local.remove(&self.addr);
        }
    }
}

/// Offers `router` to the nodes of this process under `addr` (the address the node advertises
/// in membership). Call it before registering in membership, so no peer links to it by TCP.
pub fn publish(addr: &str, router: Router) -> LocalNode {
    let open = Arc::new(AtomicBool::new(true));
    LOCAL.write().insert(addr.to_owned(), Entry { router, open: open.clone() });
    LocalNode { addr: addr.to_owned(), open }
}

/// [`publish`]es `router` under `addr` until `stop_accepting` is cancelled, then closes it:
/// what a node that serves in-memory links calls beside binding its listener.
pub fn publish_until(addr: &str, router: Router, stop_accepting: tokio_util::sync::CancellationToken) {
    let node = publish(addr, router);
    tokio::spawn(async move {
        stop_accepting.cancelled().await;
        drop(node);
    });
}

/// The link to the node at `addr`: in memory when a node of this process published that
/// address and the plane has no TLS (mutual TLS is never bypassed), else a TCP channel
/// ([`crate::nodes::channel`]; `None` for an unusable address).
pub fn connect(addr: &str, tls: Option<&Tls>) -> Option<Link> {
    if tls.is_none()
        && let Some(entry) = LOCAL.read().get(addr)
    {
        return Some(in_memory(entry.router.clone(), entry.open.clone()));
    }
    let channel = crate::nodes::channel(addr, tls)?;
    Some(BoxCloneSyncService::new(
        channel.map_response(|response| response.map(tonic::body::Body::new)).map_err(|e| LinkError(e.into())),
    ))
}

/// Whether a node of this process published `addr` (its links are in memory).
#[cfg(test)]
fn is_local(addr: &str) -> bool {
    LOCAL.read().contains_key(addr)
}

fn in_memory(router: Router, open: Arc<AtomicBool>) -> Link {
    let service = tower::service_fn(move |request: http::Request<tonic::body::Body>| {
        let router = router.clone();
        let open = open.load(Ordering::Acquire);
        async move {
            if !open {
                return Ok(tonic::Status::unavailable("node stopped accepting").into_http());
            }
            let response = router.oneshot(request).await.unwrap_or_else(|never| match never {});
            Ok::<_, LinkError>(response.map(tonic::body::Body::new))
        }
    });
    BoxCloneSyncService::new(service)
}

#[cfg(test)]
mod tests {
    use tonic::codegen::Service;

    use super::*;

    fn router() -> Router {
        Router::new().route("/x.X/Y", axum::routing::post(|| async { "ok" }))
    }

    async fn call(link: &mut Link) -> http::Response<tonic::body::Body> {
        let request = http::Request::post("/x.X/Y").body(tonic::body::Body::empty()).unwrap();
        link.ready().await.unwrap().call(request).await.unwrap()
    }

    #[tokio::test]
    async fn a_published_address_is_called_in_memory_until_it_closes() {
        let addr = "http://127.0.0.1:1/in-memory-test";
        let node = publish(addr, router());
        assert!(is_local(addr));
        let mut link = connect(addr, None).expect("a link");
        let response = call(&mut link).await;
        assert_eq!(response.status(), 200);
        assert!(response.headers().get("grpc-status").is_none(), "the router answered");

        node.close();
        let response = call(&mut link).await;
        assert_eq!(response.headers()["grpc-status"], (tonic::Code::Unavailable as i32).to_string().as_str());
        drop(node);
        assert!(!is_local(addr));
    }

    #[tokio::test]
    async fn an_address_nobody_published_gets_a_tcp_channel() {
        assert!(!is_local("http://127.0.0.1:9"));
        assert!(connect("http://127.0.0.1:9", None).is_some());
        assert!(connect("not a url", None).is_none());
    }
}
