//! One trace per turn across the nodes: W3C trace context (`traceparent`, `tracestate`) read
//! from a client's HTTP headers and carried in gRPC metadata from edge to worker to shard, and
//! the small span helpers the services share.
//!
//! Spans are `tracing` spans; the OpenTelemetry layer installed by [`crate::telemetry`] gives
//! them trace and span ids. Without that layer every helper here is a no-op. Span attributes
//! are ids, counts and labels only: never prompt or output text, never keys.

use std::time::SystemTime;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{Span as _, TraceContextExt, Tracer as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tonic::metadata::{KeyRef, MetadataKey, MetadataMap, MetadataValue};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The W3C header a client may send to make a turn part of its own trace.
pub const TRACEPARENT: &str = "traceparent";

/// The span a turn opens at the edge, the root of its trace (or a child of the client's).
pub const TURN_SPAN: &str = "edge.turn";

/// The stages under [`TURN_SPAN`] that a plain turn passes through, on all three services, in
/// the order they start.
pub const TURN_STAGES: [&str; 15] = [
    "edge.admission",
    "edge.placement",
    "edge.relay",
    "worker.turn",
    "worker.parse",
    "worker.resolve",
    "worker.validate",
    "worker.safety",
    "worker.render",
    "worker.infer",
    "worker.replicate",
    "shard.generate",
    "shard.queue",
    "shard.prefill",
    "shard.decode",
];

/// The trace context a client sent in its HTTP (or WebSocket upgrade) headers; empty if none.
pub fn from_headers(headers: &http::HeaderMap) -> Context {
    TraceContextPropagator::new().extract(&Headers(headers))
}

/// The trace context a caller put in a gRPC request's metadata; empty if none.
pub fn from_metadata(metadata: &MetadataMap) -> Context {
    TraceContextPropagator::new().extract(&Metadata(metadata))
}

/// A gRPC request carrying the current span's trace context.
pub fn request<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let context = Span::current().context();
    TraceContextPropagator::new().inject_context(&context, &mut MetadataMut(request.metadata_mut()));
    request
}

/// Makes `cx` (a remote caller's context) the parent of `span`, which must not have been
/// entered yet. An empty context leaves the span a root.
pub fn set_parent(span: &Span, cx: Context) {
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// Links `span` to the span in `cx` (a WebSocket connection's `traceparent`), if any.
pub fn link(span: &Span, cx: &Context) {
    let remote = cx.span().span_context().clone();
    if remote.is_valid() {
        span.add_link(remote);
    }
}

/// The current span's trace id (32 hex digits), if a trace is active.
pub fn trace_id() -> Option<String> {
    let context = Span::current().context();
    let span = context.span();
    let span_context = span.span_context();
    span_context.is_valid().then(|| span_context.trace_id().to_string())
}

/// The active OpenTelemetry context's trace and span ids, for log lines. Reads the context the
/// OpenTelemetry layer activated when the span was entered (cheap, no span lookup).
pub(crate) fn current_ids() -> Option<(opentelemetry::TraceId, opentelemetry::SpanId)> {
    let context = Context::current();
    let span = context.span();
    let span_context = span.span_context();
    span_context.is_valid().then(|| (span_context.trace_id(), span_context.span_id()))
}

/// Records a finished stage as a child of the current span, with the times it was measured
/// at (the shard's engines report queue, prefill and decode durations after the fact). Only
/// when spans are exported: an unsampled trace records nothing.
pub fn stage(name: &'static str, start: SystemTime, end: SystemTime, attributes: Vec<KeyValue>) {
    let Some(tracer) = crate::telemetry::tracer() else { return };
    let parent = Span::current().context();
    if !parent.span().span_context().is_sampled() {
        return;
    }
    let mut span = tracer
        .span_builder(name)
        .with_start_time(start)
        .with_attributes(attributes)
        .start_with_context(tracer, &parent);
    span.end_with_timestamp(end);
}

struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct Metadata<'a>(&'a MetadataMap);

impl Extractor for Metadata<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|key| match key {
                KeyRef::Ascii(key) => Some(key.as_str()),
                KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

struct MetadataMut<'a>(&'a mut MetadataMap);

impl Injector for MetadataMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (MetadataKey::from_bytes(key.as_bytes()), MetadataValue::try_from(value.as_str()))
        {
            self.0.insert(key, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_survives_metadata() {
        let header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut headers = http::HeaderMap::new();
        headers.insert(TRACEPARENT, header.parse().unwrap());
        let cx = from_headers(&headers);
        assert_eq!(cx.span().span_context().trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let mut metadata = MetadataMap::new();
        TraceContextPropagator::new().inject_context(&cx, &mut MetadataMut(&mut metadata));
        assert_eq!(metadata.get(TRACEPARENT).unwrap().to_str().unwrap(), header);
        let back = from_metadata(&metadata);
        assert_eq!(back.span().span_context(), cx.span().span_context());
    }

    #[test]
    fn without_a_header_there_is_no_parent() {
        let cx = from_headers(&http::HeaderMap::new());
        assert!(!cx.span().span_context().is_valid());
    }
}
