//! Answers that leave a request body unread keep HTTP/1.1 keep-alive honest.
//!
//! A request the edge answers before reading its body to the end (an unknown path or method, a
//! refused credential, a full admission queue, a body over the limit) leaves its connection
//! unusable: hyper closes it after the response instead of reading the rest. Without being
//! told, a client that pools connections (a router in front of tether probing endpoints tether
//! does not serve, the SDK's HTTP pool) sends its next request on that closing connection and
//! fails it ("connection closed before message completed"). So [`mark_unread`], a layer over
//! every route, reads the rest of a body its handler dropped unread, up to [`REST_LIMIT`]
//! within [`REST_WAIT`], and keeps the connection; a response whose body still has a rest
//! says `Connection: close`.

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

/// The most of an unread body that is read after the answer to keep its connection open; a
/// larger one closes it.
const REST_LIMIT: u64 = 1 << 20;
/// How long that rest may take to arrive.
const REST_WAIT: Duration = Duration::from_secs(1);

/// Reads what an HTTP/1 request's handler left of its body and adds `Connection: close` when
/// the body cannot be read to its end: announced larger than [`REST_LIMIT`], slower than
/// [`REST_WAIT`], or not sent yet (`Expect: 100-continue`: reading it would make the client
/// send it for nothing). HTTP/2 resets only the stream; a protocol switch keeps its own
/// `Connection` header.
pub async fn mark_unread(request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    if body.is_end_stream() || !matches!(parts.version, Version::HTTP_10 | Version::HTTP_11) {
        return next.run(Request::from_parts(parts, body)).await;
    }
    let expects_continue = parts.headers.contains_key(header::EXPECT);
    let leftover = Arc::new(Leftover::default());
    let body = Body::new(Tracked { inner: body, leftover: leftover.clone() });
    let mut response = next.run(Request::from_parts(parts, body)).await;
    if response.status() == StatusCode::SWITCHING_PROTOCOLS || leftover.ended.load(Ordering::Acquire) {
        return response;
    }
    let rest = leftover.rest.lock().take().filter(|rest| rest.size_hint().lower() <= REST_LIMIT);
    let read = match rest {
        Some(rest) if !expects_continue => read_to_end(rest).await,
        _ => false,
    };
    if !read {
        response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// Reads `body` to its end, dropping each chunk, within [`REST_WAIT`] and [`REST_LIMIT`];
/// returns whether it got to the end.
async fn read_to_end(mut body: Body) -> bool {
    let read = async {
        let mut read = 0u64;
        loop {
            match std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
                None => return true,
                Some(Ok(frame)) => {
                    read += frame.data_ref().map_or(0, |data| data.len() as u64);
                    if read > REST_LIMIT {
                        return false;
                    }
                }
                Some(Err(_)) => return false,
            }
        }
    };
    tokio::time::timeout(REST_WAIT, read).await.unwrap_or(false)
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
