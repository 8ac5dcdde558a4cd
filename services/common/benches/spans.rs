//! What tracing costs a turn when nothing is exported: the 16 spans of one turn (the edge's,
//! the worker's and the shard's, as in one process) under the log layer alone, and under the
//! log layer plus the unsampled OpenTelemetry layer that `tether` installs without
//! `--otlp-endpoint`, with a `traceparent` injection per span (a real turn makes two: edge to
//! worker, worker to shard), so it overstates the propagation part.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing::{Dispatch, Level};
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::{EnvFilter, Layer};

fn turn() {
    let turn = tracing::info_span!("edge.turn", transport = "http", request_id = "req_0123456789abcdef");
    let _turn = turn.enter();
    for name in tether_common::trace::TURN_STAGES {
        let stage = tracing::info_span!("stage", otel.name = name, tokens = 26u64);
        let _stage = stage.enter();
        black_box(tether_common::trace::request(()));
    }
}

fn log_layer() -> impl Layer<tracing_subscriber::Registry> + Send + Sync {
    tracing_subscriber::fmt::layer().with_writer(std::io::sink).with_filter(EnvFilter::new("info"))
}

fn spans(c: &mut Criterion) {
    let logs = Dispatch::new(tracing_subscriber::registry().with(log_layer()));
    c.bench_function("turn_spans/logs_only", |b| tracing::dispatcher::with_default(&logs, || b.iter(turn)));

    let provider = SdkTracerProvider::builder().with_sampler(Sampler::AlwaysOff).build();
    let own = filter_fn(|meta| meta.target().starts_with("spans") && (meta.is_span() || *meta.level() <= Level::WARN));
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("bench"))
        .with_location(false)
        .with_threads(false)
        .with_tracked_inactivity(false)
        .with_filter(own);
    let traced = Dispatch::new(tracing_subscriber::registry().with(log_layer()).with(otel));
    c.bench_function("turn_spans/logs_and_unsampled_otel", |b| {
        tracing::dispatcher::with_default(&traced, || b.iter(turn))
    });
}

criterion_group!(benches, spans);
criterion_main!(benches);
