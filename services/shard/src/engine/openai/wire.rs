//! The engine's `/v1/completions` and `/v1/models` as JSON: the request the shard sends, the
//! streamed chunks it reads, and the engine's error bodies reduced to what may be logged.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A prompt as token ids or as text.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Prompt<'a> {
    Tokens(&'a [u32]),
    Text(&'a str),
}

#[derive(Debug, Serialize)]
pub struct StreamOptions {
    pub include_usage: bool,
}

/// `POST /v1/completions` with `stream: true`.
#[derive(Debug, Serialize)]
pub struct CompletionRequest<'a> {
    pub model: &'a str,
    pub prompt: Prompt<'a>,
    pub stream: bool,
    pub max_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    /// The usage chunk at the end (vLLM and SGLang honour it; servers that do not know the
    /// field ignore it).
    pub stream_options: StreamOptions,
}

/// One streamed chunk.
#[derive(Debug, Default, Deserialize)]
pub struct CompletionChunk {
    #[serde(default)]
    pub choices: Vec<Choice>,
    #[serde(default)]
    pub usage: Option<EngineUsage>,
    /// An error reported inside the stream (some servers do, after a 200).
    #[serde(default)]
    pub error: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
pub struct Choice {
    #[serde(default)]
    pub text: String,
    #[serde(default)]
    pub finish_reason: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct EngineUsage {
    #[serde(default)]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
}

#[derive(Debug, Default, Deserialize)]
pub struct PromptTokensDetails {
    #[serde(default)]
    pub cached_tokens: Option<u32>,
}

/// `GET /v1/models`.
#[derive(Debug, Default, Deserialize)]
pub struct ModelList {
    #[serde(default)]
    pub data: Vec<ModelEntry>,
}

#[derive(Debug, Deserialize)]
pub struct ModelEntry {
    pub id: String,
}

/// Longest engine error message kept.
const MAX_MESSAGE_CHARS: usize = 200;

/// Reduces an engine's error body to its message: OpenAI's `{"error": {"message"}}`, or
/// FastAPI's validation `{"detail": [{"loc", "msg"}]}`. Never the body itself: validation
/// errors echo their input, which is the prompt.
pub fn error_message(body: &[u8]) -> String {
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return "(no JSON error body)".into();
    };
    summarize(&value)
}

/// The message of an error value (a body or a streamed chunk's `error`).
pub fn summarize(value: &Value) -> String {
    let error = value.get("error").unwrap_or(value);
    let message = if let Some(message) = error.get("message").and_then(Value::as_str) {
        message.to_owned()
    } else if let Some(details) = value.get("detail").and_then(Value::as_array) {
        let parts: Vec<String> = details
            .iter()
            .map(|detail| {
                let loc = detail.get("loc").map(Value::to_string).unwrap_or_default();
                let msg = detail.get("msg").and_then(Value::as_str).unwrap_or("invalid");
                format!("{loc}: {msg}")
            })
            .collect();
        parts.join("; ")
    } else if let Some(message) = error.as_str() {
        message.to_owned()
    } else {
        "(no message)".into()
    };
    // llama-cpp-python puts pydantic's errors, `'input': <the prompt>` included, in the message.
    let kept = ["'input'", "\"input\""].iter().filter_map(|key| message.find(key)).min().unwrap_or(message.len());
    message[..kept].chars().take(MAX_MESSAGE_CHARS).collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{CompletionRequest, Prompt, StreamOptions, error_message};

    #[test]
    fn validation_errors_lose_their_input() {
        let body = json!({"detail": [{"type": "string_type", "loc": ["body", "prompt", "str"], "msg": "Input should be a valid string", "input": [1, 2, 3]}]});
        let message = error_message(body.to_string().as_bytes());
        assert_eq!(message, r#"["body","prompt","str"]: Input should be a valid string"#);
        let openai =
            json!({"error": {"message": "maximum context length is 2048 tokens", "type": "invalid_request_error"}});
        assert_eq!(error_message(openai.to_string().as_bytes()), "maximum context length is 2048 tokens");
        assert_eq!(error_message(b"<html>"), "(no JSON error body)");
        let llama_cpp_python = json!({"error": {"message": "4 validation errors:\n  {'type': 'string_type', 'loc': ('body', 'prompt', 'str'), 'msg': 'Input should be a valid string', 'input': [1, 2, 3]}"}});
        let message = error_message(llama_cpp_python.to_string().as_bytes());
        assert!(message.ends_with("'msg': 'Input should be a valid string', "), "{message}");
    }

    #[test]
    fn prompts_serialize_as_ids_or_text() {
        let ids = [1, 2];
        let request = |prompt| CompletionRequest {
            model: "m",
            prompt,
            stream: true,
            max_tokens: 4,
            temperature: Some(0.0),
            top_p: None,
            stream_options: StreamOptions { include_usage: true },
        };
        let tokens = serde_json::to_value(request(Prompt::Tokens(&ids))).unwrap();
        assert_eq!(tokens["prompt"], json!([1, 2]));
        assert!(tokens.get("top_p").is_none());
        let text = serde_json::to_value(request(Prompt::Text("hi"))).unwrap();
        assert_eq!(text["prompt"], json!("hi"));
    }
}
