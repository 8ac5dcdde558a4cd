//! Logging, tracing and the process-wide Prometheus recorder.
//!
//! One subscriber per process (the in-process cluster and `tether dev` share it): a log layer
//! (plain or JSON, filtered by `RUST_LOG`) and an OpenTelemetry layer that turns tether's own
//! spans into OpenTelemetry spans, whatever `RUST_LOG` says, so every turn has a trace id. With
//! `--otlp-endpoint` the spans are exported over OTLP/gRPC in batches; without it they are not
//! sampled (the ids still propagate and reach the logs, nothing is recorded or sent).

use std::sync::OnceLock;
use std::time::Duration;

use clap::ValueEnum;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    #[default]
    Plain,
    Json,
}

/// What one process logs and where its spans go.
#[derive(Clone, Debug, Default)]
pub struct TelemetryConfig {
    pub log_format: LogFormat,
    /// An OTLP/gRPC collector, e.g. `http://127.0.0.1:4317`; `None` exports nothing.
    pub otlp_endpoint: Option<String>,
    /// The OpenTelemetry `service.name` of this process (`tether-edge`, `tether` for dev).
    pub service_name: String,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid --otlp-endpoint: {0}")]
pub struct TelemetryError(String);

/// Keeps the span exporter of [`init`]; flush and shut it down when the process ends.
#[must_use = "dropping the guard does not flush; call shutdown()"]
pub struct TelemetryGuard {
    provider: SdkTracerProvider,
}

impl TelemetryGuard {
    /// Sends the spans that ended so far (blocks: call it off the async workers).
    pub fn flush(&self) {
        let _ = self.provider.force_flush();
    }

    /// Flushes and stops the exporter (blocks: call it off the async workers).
    pub fn shutdown(&self) {
        let _ = self.provider.shutdown_with_timeout(Duration::from_secs(5));
    }
}

/// Targets whose spans become OpenTelemetry spans: tether's crates, not its dependencies.
const OWN_TARGETS: &str = "tether";

/// The tracer of the installed provider, for spans built with explicit times
/// ([`crate::trace::stage`]).
static TRACER: OnceLock<SdkTracer> = OnceLock::new();

pub(crate) fn tracer() -> Option<&'static SdkTracer> {
    TRACER.get()
}

/// Installs the global subscriber: `RUST_LOG`-style filter (default `info`) and the chosen
/// format on stderr, plus the OpenTelemetry layer. Must run inside a Tokio runtime when an
/// endpoint is given (the exporter's channel is created there). A second init (several
/// services in one process) keeps the first subscriber and returns `None`.
pub fn init(config: &TelemetryConfig) -> Result<Option<TelemetryGuard>, TelemetryError> {
    use std::io::IsTerminal;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,llama-cpp-2=warn"));
    // Colours only on a terminal: log files and collectors get plain text.
    let ansi = std::io::stderr().is_terminal();
    let log = match config.log_format {
        LogFormat::Plain => tracing_subscriber::fmt::layer().with_ansi(ansi).with_writer(std::io::stderr).boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .event_format(WithTraceId(tracing_subscriber::fmt::format().json()))
            .with_writer(std::io::stderr)
            .boxed(),
    };
    install(log.with_filter(filter).boxed(), config)
}

/// Installs a test subscriber once per process (output captured by the test harness), with
/// unsampled tracing so trace ids exist and propagate.
pub fn init_for_test() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
        let log = tracing_subscriber::fmt::layer().with_test_writer().with_filter(filter).boxed();
        let _ = install(log, &TelemetryConfig::default());
    });
}

/// Like [`init_for_test`], exporting spans to `endpoint`; call it before anything else sets a
/// subscriber (the first one wins). Returns `None` when a subscriber was already installed.
pub fn init_for_test_with_otlp(endpoint: &str, service_name: &str) -> Option<TelemetryGuard> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    let log = tracing_subscriber::fmt::layer()
        .json()
        .event_format(WithTraceId(tracing_subscriber::fmt::format().json()))
        .with_test_writer()
        .with_filter(filter)
        .boxed();
    let config = TelemetryConfig {
        log_format: LogFormat::Json,
        otlp_endpoint: Some(endpoint.to_owned()),
        service_name: service_name.to_owned(),
    };
    install(log, &config).ok().flatten()
}

type BoxedLayer = Box<dyn Layer<Registry> + Send + Sync>;

fn install(log: BoxedLayer, config: &TelemetryConfig) -> Result<Option<TelemetryGuard>, TelemetryError> {
    let provider = provider(config)?;
    let tracer = provider.tracer("tether");
    // Only tether's spans (and its warnings and errors, as span events) reach OpenTelemetry.
    let own =
        filter_fn(|meta| meta.target().starts_with(OWN_TARGETS) && (meta.is_span() || *meta.level() <= Level::WARN));
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer.clone())
        .with_location(false)
        .with_threads(false)
        // busy/idle times cost two clock reads per poll: only when the spans go somewhere
        .with_tracked_inactivity(config.otlp_endpoint.is_some())
        .with_filter(own)
        .boxed();
    if tracing_subscriber::registry().with(vec![otel, log]).try_init().is_err() {
        let _ = provider.shutdown();
        return Ok(None);
    }
    let _ = TRACER.set(tracer);
    opentelemetry::global::set_tracer_provider(provider.clone());
    Ok(Some(TelemetryGuard { provider }))
}

/// The process's tracer provider: batches to an OTLP/gRPC exporter when an endpoint is given
/// (and samples a turn unless its caller's `traceparent` says not to), else samples nothing.
fn provider(config: &TelemetryConfig) -> Result<SdkTracerProvider, TelemetryError> {
    let name = if config.service_name.is_empty() { "tether" } else { config.service_name.as_str() };
    let builder =
        SdkTracerProvider::builder().with_resource(Resource::builder().with_service_name(name.to_owned()).build());
    let Some(endpoint) = &config.otlp_endpoint else {
        return Ok(builder.with_sampler(Sampler::AlwaysOff).build());
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint.clone())
        .with_timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| TelemetryError(e.to_string()))?;
    Ok(builder.with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOn))).with_batch_exporter(exporter).build())
}

/// A JSON event format that puts `trace_id` and `span_id` first in every line logged inside a
/// traced span; the rest of the line is the inner format's.
struct WithTraceId<F>(F);

impl<S, N, F> FormatEvent<S, N> for WithTraceId<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> std::fmt::Result {
        let Some((trace_id, span_id)) = crate::trace::current_ids() else {
            return self.0.format_event(ctx, writer, event);
        };
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        match line.strip_prefix('{') {
            Some(rest) => write!(writer, "{{\"trace_id\":\"{trace_id}\",\"span_id\":\"{span_id}\",{rest}"),
            None => writer.write_str(&line),
        }
    }
}

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();

/// Returns the process-wide Prometheus handle, installing the recorder on first use. Several
/// services in one process (`tether dev`, tests) share it; their metric prefixes differ.
pub fn prometheus() -> PrometheusHandle {
    PROMETHEUS
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0,
                ])
                .expect("static buckets are valid")
                .build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics may be empty");
            }
            handle
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().write(bytes)
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn json_lines_inside_a_turn_start_with_its_trace_id() {
        let provider = SdkTracerProvider::builder().with_sampler(Sampler::AlwaysOff).build();
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let log = tracing_subscriber::fmt::layer()
            .json()
            .event_format(WithTraceId(tracing_subscriber::fmt::format().json()))
            .with_writer(move || writer.clone());
        let otel = tracing_opentelemetry::layer().with_tracer(provider.tracer("test"));
        let subscriber = tracing_subscriber::registry().with(otel).with(log);
        let trace_id = tracing::subscriber::with_default(subscriber, || {
            tracing::info!("outside any span");
            let span = tracing::info_span!("edge.turn");
            let _entered = span.enter();
            tracing::info!(tokens = 3, "inside the turn");
            crate::trace::trace_id().expect("a trace id, though nothing is sampled")
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text.lines().map(|line| serde_json::from_str(line).unwrap()).collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].get("trace_id").is_none(), "no trace outside a span: {text}");
        assert_eq!(lines[1]["trace_id"], trace_id.as_str());
        assert_eq!(lines[1]["span_id"].as_str().map(str::len), Some(16));
        assert_eq!(lines[1]["fields"]["tokens"], 3, "the inner format's fields are kept");
        assert_eq!(lines[1]["fields"]["message"], "inside the turn");
    }
}
