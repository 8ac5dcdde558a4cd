//! Measurements of one mode: HDR histograms (microseconds, bytes) plus counters, shared by all
//! agents of the mode behind a short lock, and the error classes failures are counted by.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use parking_lot::Mutex;

/// Why a turn failed; the label it is counted under in the report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// TCP/WebSocket/gRPC connection could not be made (or broke before a reply).
    Connect,
    /// A non-2xx HTTP reply (or handshake reply), with the body's `error.code` when present.
    HttpStatus(u16, Option<String>),
    /// An `error` event (WebSocket nested or SSE flat), by `code`.
    ErrorEvent(String),
    /// A `response.failed` terminal, by `response.error.code`.
    ResponseFailed(String),
    /// A `response.incomplete` terminal, by `incomplete_details.reason`.
    ResponseIncomplete(String),
    /// The turn took longer than `--request-timeout`.
    Timeout,
    /// The stream ended early, a frame did not parse, or the model broke the tool policy.
    Protocol(&'static str),
    /// gRPC status from the shard (direct mode).
    Grpc(String),
}

impl ErrorClass {
    pub fn label(&self) -> String {
        match self {
            ErrorClass::Connect => "connect".into(),
            ErrorClass::HttpStatus(status, None) => format!("http_{status}"),
            ErrorClass::HttpStatus(status, Some(code)) => format!("http_{status}:{code}"),
            ErrorClass::ErrorEvent(code) => format!("error_event:{code}"),
            ErrorClass::ResponseFailed(code) => format!("response_failed:{code}"),
            ErrorClass::ResponseIncomplete(reason) => format!("response_incomplete:{reason}"),
            ErrorClass::Timeout => "timeout".into(),
            ErrorClass::Protocol(what) => format!("protocol:{what}"),
            ErrorClass::Grpc(code) => format!("grpc:{code}"),
        }
    }
}

/// A failed turn: its class plus a detail line for the first-error log.
#[derive(Debug)]
pub struct TurnError {
    pub class: ErrorClass,
    pub detail: String,
}

impl TurnError {
    pub fn new(class: ErrorClass, detail: impl Into<String>) -> Self {
        TurnError { class, detail: detail.into() }
    }

    pub fn protocol(what: &'static str, detail: impl Into<String>) -> Self {
        TurnError::new(ErrorClass::Protocol(what), detail)
    }
}

/// What one successful model call measured.
#[derive(Clone, Debug, Default)]
pub struct TurnSample {
    pub total: Duration,
    pub ttft: Option<Duration>,
    pub inter_token: Vec<Duration>,
    pub bytes_sent: u64,
    pub input_tokens: Option<u64>,
    pub cached_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    /// Shard-reported engine time (`x_tether.engine_us`), when the server sent it.
    pub engine: Option<Duration>,
}

/// All measurements of one mode.
pub struct Stats {
    pub workflow: Histogram<u64>,
    pub turn: Histogram<u64>,
    pub ttft: Histogram<u64>,
    pub inter_token: Histogram<u64>,
    pub overhead: Histogram<u64>,
    pub bytes_sent: Histogram<u64>,
    pub workflows_ok: u64,
    pub workflows_failed: u64,
    pub turns_ok: u64,
    pub bytes_sent_total: u64,
    pub input_tokens: u64,
    pub cached_tokens: u64,
    pub output_tokens: u64,
    /// Turns whose usage was reported (denominator of the token means).
    pub turns_with_usage: u64,
    pub errors: BTreeMap<String, u64>,
    pub first_error: Option<String>,
}

/// Microsecond histogram bounds: 1 µs .. 10 min, 3 significant digits.
fn micros_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

fn micros(d: Duration) -> u64 {
    (d.as_micros() as u64).max(1)
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            workflow: micros_histogram(),
            turn: micros_histogram(),
            ttft: micros_histogram(),
            inter_token: micros_histogram(),
            overhead: micros_histogram(),
            bytes_sent: Histogram::new_with_bounds(1, 1 << 36, 3).expect("valid histogram bounds"),
            workflows_ok: 0,
            workflows_failed: 0,
            turns_ok: 0,
            bytes_sent_total: 0,
            input_tokens: 0,
            cached_tokens: 0,
            output_tokens: 0,
            turns_with_usage: 0,
            errors: BTreeMap::new(),
            first_error: None,
        }
    }
}

impl Stats {
    pub fn record_turn(&mut self, sample: &TurnSample) {
        self.turns_ok += 1;
        self.turn.saturating_record(micros(sample.total));
        if let Some(ttft) = sample.ttft {
            self.ttft.saturating_record(micros(ttft));
        }
        for gap in &sample.inter_token {
            self.inter_token.saturating_record(micros(*gap));
        }
        if let Some(engine) = sample.engine {
            self.overhead.saturating_record(micros(sample.total.saturating_sub(engine)));
        }
        self.bytes_sent.saturating_record(sample.bytes_sent.max(1));
        self.bytes_sent_total += sample.bytes_sent;
        if let Some(input) = sample.input_tokens {
            self.turns_with_usage += 1;
            self.input_tokens += input;
            self.cached_tokens += sample.cached_tokens.unwrap_or(0);
        }
        self.output_tokens += sample.output_tokens.unwrap_or(0);
    }

    pub fn record_error(&mut self, error: &TurnError) {
        *self.errors.entry(error.class.label()).or_default() += 1;
        if self.first_error.is_none() {
            self.first_error = Some(format!("{}: {}", error.class.label(), error.detail));
        }
    }

    /// Counts a failure that is not a turn (a dropped open-loop arrival, a cancelled workflow).
    pub fn record_event(&mut self, label: &str) {
        *self.errors.entry(label.to_owned()).or_default() += 1;
    }

    pub fn record_workflow(&mut self, elapsed: Duration, ok: bool) {
        if ok {
            self.workflows_ok += 1;
            self.workflow.saturating_record(micros(elapsed));
        } else {
            self.workflows_failed += 1;
        }
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// The shared recorder handed to every agent of a mode.
pub type Recorder = Arc<Mutex<Stats>>;

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{ErrorClass, Stats, TurnError, TurnSample};

    #[test]
    fn overhead_is_turn_time_minus_engine_time() {
        let mut stats = Stats::default();
        let sample = TurnSample {
            total: Duration::from_millis(10),
            engine: Some(Duration::from_millis(7)),
            bytes_sent: 500,
            input_tokens: Some(100),
            cached_tokens: Some(80),
            output_tokens: Some(5),
            ..TurnSample::default()
        };
        stats.record_turn(&sample);
        stats.record_turn(&TurnSample { engine: None, ..sample });
        assert_eq!(stats.overhead.len(), 1);
        let overhead = stats.overhead.value_at_quantile(0.5);
        assert!((2_990..=3_010).contains(&overhead), "{overhead}");
        assert_eq!(stats.turns_ok, 2);
        assert_eq!((stats.input_tokens, stats.cached_tokens, stats.bytes_sent_total), (200, 160, 1000));
    }

    #[test]
    fn errors_count_by_class() {
        let mut stats = Stats::default();
        stats.record_error(&TurnError::new(ErrorClass::HttpStatus(400, Some("x".into())), "a"));
        stats.record_error(&TurnError::new(ErrorClass::HttpStatus(400, Some("x".into())), "b"));
        stats.record_error(&TurnError::new(ErrorClass::Timeout, "c"));
        assert_eq!(stats.errors["http_400:x"], 2);
        assert_eq!(stats.error_count(), 3);
        assert_eq!(stats.first_error.as_deref(), Some("http_400:x: a"));
    }
}
