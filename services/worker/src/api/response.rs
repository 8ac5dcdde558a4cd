//! The Response object: the settings echoed from the request, plus status, output and usage.

use serde_json::{Map, Value, json};

use super::request::CreateRequest;

/// The parts of a Response that stay the same through its lifecycle.
#[derive(Clone, Debug)]
pub struct ResponseTemplate {
    base: Map<String, Value>,
}

impl ResponseTemplate {
    pub fn new(id: &str, created_at: u64, request: &CreateRequest, previous: Option<&str>) -> Self {
        let echo = |key: &str, default: Value| request.echo.get(key).cloned().unwrap_or(default);
        let base = json!({
            "id": id,
            "object": "response",
            "created_at": created_at,
            "status": "in_progress",
            "completed_at": null,
            "model": request.model,
            "previous_response_id": previous,
            "store": request.store,
            "instructions": request.instructions,
            "error": null,
            "incomplete_details": null,
            "background": false,
            "max_output_tokens": request.max_output_tokens,
            "max_tool_calls": null,
            "parallel_tool_calls": request.parallel_tool_calls,
            "temperature": request.temperature.unwrap_or(1.0),
            "top_p": request.top_p.unwrap_or(1.0),
            "top_logprobs": 0,
            "truncation": echo("truncation", json!("disabled")),
            "text": echo("text", json!({"format": {"type": "text"}, "verbosity": "medium"})),
            "reasoning": echo("reasoning", json!({"effort": null, "summary": null})),
            "tool_choice": request.tool_choice_echo,
            "tools": request.tools,
            "metadata": request.metadata,
            "user": echo("user", Value::Null),
            "service_tier": "default",
            "safety_identifier": echo("safety_identifier", Value::Null),
            "prompt_cache_key": request.prompt_cache_key,
            "output": [],
            "usage": null,
        });
        let Value::Object(base) = base else { unreachable!("a json object literal") };
        ResponseTemplate { base }
    }

    /// Returns a snapshot with `status` and whatever `fill` sets (output, usage, error, ...).
    pub fn snapshot(&self, status: &str, fill: impl FnOnce(&mut Map<String, Value>)) -> Value {
        let mut object = self.base.clone();
        object.insert("status".into(), Value::String(status.into()));
        fill(&mut object);
        Value::Object(object)
    }
}

/// The usage object of a finished response.
pub fn usage(input: u32, cached: u32, output: u32) -> Value {
    json!({
        "input_tokens": input,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input + output,
    })
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
