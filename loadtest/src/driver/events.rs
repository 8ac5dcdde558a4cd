//! Reads a Responses API event stream (WebSocket messages or SSE `data:` payloads, the same
//! JSON either way) and turns it into one turn's measurements and output.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::stats::{ErrorClass, TurnError, TurnSample};

/// What the model did in one turn.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelAction {
    /// A function call to answer with a `function_call_output` of this `call_id`.
    ToolCall { call_id: String },
    /// A final answer (no function call in the output).
    Answer,
}

/// One completed model call.
#[derive(Debug)]
pub struct TurnReply {
    pub sample: TurnSample,
    pub response_id: Option<String>,
    /// The terminal response's `output` items, as returned (replayed by `http-full`).
    pub output: Vec<Value>,
    pub action: ModelAction,
}

/// Accumulates timing over the events of one response, from the moment the request was sent.
pub struct EventTracker {
    sent_at: Instant,
    first_output: Option<Instant>,
    last_delta: Option<Instant>,
    inter_token: Vec<Duration>,
}

const DELTA_EVENTS: [&str; 2] = ["response.output_text.delta", "response.function_call_arguments.delta"];

impl EventTracker {
    pub fn new(sent_at: Instant) -> Self {
        EventTracker { sent_at, first_output: None, last_delta: None, inter_token: Vec::new() }
    }

    /// Feeds one event received at `at`; returns the terminal `response` object once it
    /// arrives, or the turn's error.
    pub fn on_event(&mut self, event: Value, at: Instant) -> Result<Option<Value>, TurnError> {
        let kind = event.get("type").and_then(Value::as_str).unwrap_or_default();
        let is_delta = DELTA_EVENTS.contains(&kind);
        if is_delta || kind == "response.output_item.added" {
            self.first_output.get_or_insert(at);
        }
        if is_delta && let Some(last) = self.last_delta.replace(at) {
            self.inter_token.push(at - last);
        }
        match kind {
            "response.completed" => Ok(Some(take_response(event)?)),
            "response.failed" => {
                let code = str_at(&event, &["response", "error", "code"]).unwrap_or("unknown");
                Err(TurnError::new(ErrorClass::ResponseFailed(code.into()), message(&event)))
            }
            "response.incomplete" => {
                let reason = str_at(&event, &["response", "incomplete_details", "reason"]).unwrap_or("unknown");
                Err(TurnError::new(ErrorClass::ResponseIncomplete(reason.into()), reason.to_owned()))
            }
            "error" => {
                // WebSocket errors nest under `error`; SSE errors are flat.
                let code = str_at(&event, &["error", "code"])
                    .or_else(|| str_at(&event, &["code"]))
                    .or_else(|| str_at(&event, &["error", "type"]))
                    .unwrap_or("unknown");
                Err(TurnError::new(ErrorClass::ErrorEvent(code.into()), message(&event)))
            }
            _ => Ok(None),
        }
    }

    /// Builds the reply from the terminal response object received at `at`.
    pub fn finish(self, response: Value, at: Instant, bytes_sent: u64) -> TurnReply {
        let usage = response.get("usage");
        let usage_u64 = |path: &[&str]| {
            let mut value = usage?;
            for key in path {
                value = value.get(key)?;
            }
            value.as_u64()
        };
        let engine = response.get("x_tether").and_then(shard_time);
        let sample = TurnSample {
            total: at - self.sent_at,
            ttft: self.first_output.map(|t| t - self.sent_at),
            inter_token: self.inter_token,
            bytes_sent,
            input_tokens: usage_u64(&["input_tokens"]),
            cached_tokens: usage_u64(&["input_tokens_details", "cached_tokens"]),
            output_tokens: usage_u64(&["output_tokens"]),
            engine,
        };
        let output = match response.get("output") {
            Some(Value::Array(items)) => items.clone(),
            _ => Vec::new(),
        };
        let action = output
            .iter()
            .find(|item| item.get("type").and_then(Value::as_str) == Some("function_call"))
            .and_then(|item| item.get("call_id").and_then(Value::as_str))
            .map_or(ModelAction::Answer, |call_id| ModelAction::ToolCall { call_id: call_id.to_owned() });
        let response_id = response.get("id").and_then(Value::as_str).map(str::to_owned);
        TurnReply { sample, response_id, output, action }
    }
}

/// Returns the shard's time for the turn from `x_tether`: queue + prefill + decode when the
/// parts are reported (the same sum `direct` mode takes from the shard's timings), else
/// `engine_us`. Waiting for a shard slot is engine time, not router overhead.
fn shard_time(x_tether: &Value) -> Option<Duration> {
    let field = |name: &str| x_tether.get(name).and_then(Value::as_u64);
    let parts = match (field("prefill_us"), field("decode_us")) {
        (Some(prefill), Some(decode)) => Some(field("queue_us").unwrap_or(0) + prefill + decode),
        _ => field("engine_us"),
    };
    parts.map(Duration::from_micros)
}

fn take_response(mut event: Value) -> Result<Value, TurnError> {
    match event.get_mut("response").map(Value::take) {
        Some(response @ Value::Object(_)) => Ok(response),
        _ => Err(TurnError::protocol("terminal_without_response", "response.completed has no response")),
    }
}

fn str_at<'a>(value: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut value = value;
    for key in path {
        value = value.get(key)?;
    }
    value.as_str()
}

fn message(event: &Value) -> String {
    str_at(event, &["error", "message"])
        .or_else(|| str_at(event, &["message"]))
        .or_else(|| str_at(event, &["response", "error", "message"]))
        .unwrap_or("")
        .to_owned()
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use serde_json::json;

    use super::{EventTracker, ModelAction};
    use crate::stats::ErrorClass;

    #[test]
    fn tracks_ttft_gaps_usage_and_tool_calls() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut tracker = EventTracker::new(t0);
        assert!(tracker.on_event(json!({"type":"response.created"}), ms(1)).unwrap().is_none());
        tracker.on_event(json!({"type":"response.output_item.added"}), ms(4)).unwrap();
        tracker.on_event(json!({"type":"response.function_call_arguments.delta"}), ms(5)).unwrap();
        tracker.on_event(json!({"type":"response.function_call_arguments.delta"}), ms(8)).unwrap();
        let completed = json!({"type":"response.completed","response":{
            "id":"resp_1",
            "output":[{"type":"function_call","call_id":"call_9","name":"run_tests","arguments":"{}"}],
            "usage":{"input_tokens":120,"input_tokens_details":{"cached_tokens":100},"output_tokens":12},
            "x_tether":{"engine_us":5000,"queue_us":1000,"prefill_us":2000,"decode_us":3000}}});
        let response = tracker.on_event(completed, ms(10)).unwrap().unwrap();
        let reply = tracker.finish(response, ms(10), 321);
        assert_eq!(reply.action, ModelAction::ToolCall { call_id: "call_9".into() });
        assert_eq!(reply.response_id.as_deref(), Some("resp_1"));
        assert_eq!(reply.sample.ttft, Some(Duration::from_millis(4)));
        assert_eq!(reply.sample.inter_token, vec![Duration::from_millis(3)]);
        assert_eq!(reply.sample.engine, Some(Duration::from_millis(6)));
        assert_eq!((reply.sample.input_tokens, reply.sample.cached_tokens), (Some(120), Some(100)));
    }

    #[test]
    fn classifies_failures() {
        let mut tracker = EventTracker::new(Instant::now());
        let nested = json!({"type":"error","status":400,"error":{"code":"previous_response_not_found","message":"m"}});
        let err = tracker.on_event(nested, Instant::now()).unwrap_err();
        assert_eq!(err.class, ErrorClass::ErrorEvent("previous_response_not_found".into()));
        let failed = json!({"type":"response.failed","response":{"error":{"code":"server_error","message":"x"}}});
        let err = tracker.on_event(failed, Instant::now()).unwrap_err();
        assert_eq!(err.class, ErrorClass::ResponseFailed("server_error".into()));
    }
}
