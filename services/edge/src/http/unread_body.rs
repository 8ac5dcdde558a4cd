//! Answers that leave a request body unread keep HTTP/1.1 keep-alive honest.
//!
//! A request the edge answers before reading its body to the end (an unknown path or method, a
//! refused credential, a full admission queue, a body over the limit) leaves its connection
//! unusable: hyper closes it after the response instead of reading the rest. Without being
//! told, a client that pools connections (a router in front of tether, the SDK's HTTP pool)
//! sends its next request on that closing connection and fails it ("connection closed before
//! message completed"). So:
//!
//! - such a response says `Connection: close` ([`mark_unread`], a layer over every route), and
//! - the fallbacks for unknown paths and methods read and drop a body of moderate size first,
//!   within `--body-read-timeout` ([`drain`]), so a client probing an endpoint tether does not
//!   serve keeps its connection.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::Response;
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};

/// The most a fallback reads to keep a connection open; a larger body closes it.
const DRAIN_LIMIT: usize = 1 << 20;

/// Adds `Connection: close` to a response whose request body was not read to its end.
pub async fn mark_unread(request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    if body.is_end_stream() {
        return next.run(Request::from_parts(parts, body)).await;
    }
    let ended = Arc::new(AtomicBool::new(false));
    let body = Body::new(Tracked { inner: body, ended: ended.clone() });
    let mut response = next.run(Request::from_parts(parts, body)).await;
    if !ended.load(Ordering::Acquire) {
        response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// Reads and drops a request body of up to [`DRAIN_LIMIT`] bytes within `limit` (a larger or
/// slower one is left, and [`mark_unread`] closes the connection).
pub async fn drain(body: Body, limit: Duration) {
    let _ = tokio::time::timeout(limit, axum::body::to_bytes(body, DRAIN_LIMIT)).await;
}

/// A request body that notes when it has been read to its end.
struct Tracked {
    inner: Body,
    ended: Arc<AtomicBool>,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) || self.inner.is_end_stream() {
            self.ended.store(true, Ordering::Release);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
