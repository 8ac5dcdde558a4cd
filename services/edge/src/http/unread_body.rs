//! Answers that leave a request body unread keep HTTP/1.1 keep-alive honest.
//!
//! A request the edge answers before reading its body to the end (an unknown path or method, a
//! refused credential, a full admission queue, a body over the limit) leaves its connection
//! unusable: hyper closes it after the response instead of reading the rest. Without being
//! told, a client that pools connections (a router in front of tether, the SDK's HTTP pool)
//! sends its next request on that closing connection and fails it ("connection closed before
//! message completed"). So:
//!
//! - the rest of a small body a handler dropped unread (a refusal: 401, 429) is read after
//!   the answer is ready, and a response whose body still has a rest says `Connection: close`
//!   ([`mark_unread`], a layer over every route), and
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
use parking_lot::Mutex;

/// The most a fallback reads to keep a connection open; a larger body closes it.
const DRAIN_LIMIT: usize = 1 << 20;

/// The rest of a body a handler dropped unread (a refused request: 401, 429, a cancel that
/// ignores its body) is read after the answer is ready when it is at most this large, so the
/// connection stays open, as hyper keeps it when the rest is already buffered; a larger rest
/// closes it.
const KEEP_LIMIT: u64 = 64 * 1024;
/// How long the rest of such a body may take to arrive.
const REST_WAIT: Duration = Duration::from_secs(1);

/// Adds `Connection: close` to an HTTP/1 response whose request body was not read to its end
/// (HTTP/2 resets only the stream; a protocol switch keeps its own `Connection` header).
pub async fn mark_unread(request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    if body.is_end_stream() || !is_http1(parts.version) {
        return next.run(Request::from_parts(parts, body)).await;
    }
    let leftover = Arc::new(Leftover::default());
    let body = Body::new(Tracked { inner: body, leftover: leftover.clone() });
    let mut response = next.run(Request::from_parts(parts, body)).await;
    if response.status() == StatusCode::SWITCHING_PROTOCOLS || leftover.ended.load(Ordering::Acquire) {
        return response;
    }
    let rest = leftover.rest.lock().take();
    let small = |rest: &Body| rest.size_hint().upper().is_some_and(|bytes| bytes <= KEEP_LIMIT);
    let read = match rest {
        Some(rest) if small(&rest) => read_to_end(rest, REST_WAIT, KEEP_LIMIT as usize).await,
        _ => false,
    };
    if !read {
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
    read_to_end(request.into_body(), limit, DRAIN_LIMIT).await;
}

/// Reads `body` to its end, dropping each chunk, within `limit` and `max_bytes`; returns
/// whether it got to the end.
async fn read_to_end(mut body: Body, limit: Duration, max_bytes: usize) -> bool {
    let read = async {
        let mut read = 0usize;
        loop {
            match std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
                None => return true,
                Some(Ok(frame)) => {
                    read += frame.data_ref().map_or(0, Bytes::len);
                    if read > max_bytes {
                        return false;
                    }
                }
                Some(Err(_)) => return false,
            }
        }
    };
    tokio::time::timeout(limit, read).await.unwrap_or(false)
}

/// What a request's body left: whether it was read to its end, and else the unread rest once
/// the handler dropped it.
#[derive(Default)]
struct Leftover {
    ended: AtomicBool,
    rest: Mutex<Option<Body>>,
}

/// A request body that notes when it has been read to its end, and hands its unread rest to
/// [`mark_unread`] when dropped.
struct Tracked {
    inner: Body,
    leftover: Arc<Leftover>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if !self.leftover.ended.load(Ordering::Acquire) {
            *self.leftover.rest.lock() = Some(std::mem::replace(&mut self.inner, Body::empty()));
        }
    }
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) || self.inner.is_end_stream() {
            self.leftover.ended.store(true, Ordering::Release);
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
