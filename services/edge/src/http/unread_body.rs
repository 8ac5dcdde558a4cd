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
//! - the fallbacks for unknown paths and methods read a body of moderate size first, dropping
//!   it chunk by chunk, within `--body-read-timeout` ([`drain`]), so a client probing an
//!   endpoint tether does not serve keeps its connection.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, Version, header};
use axum::middleware::Next;
use axum::response::Response;
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};

/// The most a fallback reads to keep a connection open; a larger body closes it.
const DRAIN_LIMIT: usize = 1 << 20;

/// Adds `Connection: close` to an HTTP/1 response whose request body was not read to its end
/// (HTTP/2 resets only the stream; a protocol switch keeps its own `Connection` header).
pub async fn mark_unread(request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    if body.is_end_stream() || !is_http1(parts.version) {
        return next.run(Request::from_parts(parts, body)).await;
    }
    let ended = Arc::new(AtomicBool::new(false));
    let body = Body::new(Tracked { inner: body, ended: ended.clone() });
    let mut response = next.run(Request::from_parts(parts, body)).await;
    if !ended.load(Ordering::Acquire) && response.status() != StatusCode::SWITCHING_PROTOCOLS {
        response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

fn is_http1(version: Version) -> bool {
    matches!(version, Version::HTTP_10 | Version::HTTP_11)
}

/// Reads a request's body to its end within `limit`, dropping each chunk as it arrives, when
/// that keeps its HTTP/1 connection usable: a body announced larger than [`DRAIN_LIMIT`] or
/// not sent yet (`Expect: 100-continue`), an HTTP/2 stream, or one slower than `limit` is
/// left unread, and [`mark_unread`] closes the connection.
pub async fn drain(request: Request, limit: Duration) {
    let announced = request.body().size_hint().lower();
    let expects_continue = request.headers().contains_key(header::EXPECT);
    if !is_http1(request.version()) || expects_continue || announced > DRAIN_LIMIT as u64 {
        return;
    }
    let mut body = request.into_body();
    let read = async {
        let mut read = 0usize;
        while let Some(Ok(frame)) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
            read += frame.data_ref().map_or(0, Bytes::len);
            if read > DRAIN_LIMIT {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(limit, read).await;
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
