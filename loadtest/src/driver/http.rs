//! `http-chained`, `http-full` and `http-full-keyless` modes: `POST /v1/responses` with
//! `"stream": true`, read as SSE, over a new connection per request (the client keeps no idle
//! connections).

use std::sync::Arc;
use std::time::Instant;

use futures_util::StreamExt;

use super::events::{EventTracker, TurnReply};
use super::{Conversation, ModeContext, request};
use crate::stats::{ErrorClass, TurnError};

pub struct HttpAgent {
    ctx: Arc<ModeContext>,
    url: String,
}

impl HttpAgent {
    pub fn new(ctx: Arc<ModeContext>) -> Self {
        let url = format!("{}/v1/responses", ctx.config.target.http_url);
        HttpAgent { ctx, url }
    }

    pub async fn turn(&mut self, conv: &Conversation<'_>) -> Result<TurnReply, TurnError> {
        let target = &self.ctx.config.target;
        let body = request::create_body(self.ctx.mode, &target.model, conv).to_string();
        let bytes_sent = body.len() as u64;
        let sent_at = Instant::now();
        let response = self
            .ctx
            .http
            .post(&self.url)
            .bearer_auth(&target.api_key)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .map_err(request_error)?;
        let status = response.status();
        if !status.is_success() {
            let body = response.bytes().await.unwrap_or_default();
            let code = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.pointer("/error/code").and_then(|c| c.as_str()).map(str::to_owned));
            let detail = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
            return Err(TurnError::new(ErrorClass::HttpStatus(status.as_u16(), code), detail));
        }
        let mut tracker = EventTracker::new(sent_at);
        let mut parser = SseParser::default();
        let mut stream = response.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(request_error)?;
            let at = Instant::now();
            for data in parser.push(&chunk) {
                if data == "[DONE]" {
                    continue;
                }
                let event = serde_json::from_str(&data).map_err(|e| TurnError::protocol("bad_json", e.to_string()))?;
                if let Some(response) = tracker.on_event(event, at)? {
                    return Ok(tracker.finish(response, at, bytes_sent));
                }
            }
        }
        Err(TurnError::protocol("sse_ended", "stream ended without a terminal event"))
    }
}

fn request_error(error: reqwest::Error) -> TurnError {
    let class = if error.is_connect() {
        ErrorClass::Connect
    } else if error.is_timeout() {
        ErrorClass::Timeout
    } else {
        ErrorClass::Protocol("http_read")
    };
    TurnError::new(class, error.to_string())
}

/// Incremental SSE decoder: yields the `data:` payload of each complete event (several
/// `data:` lines of one event joined with `\n`); ignores `event:`, `id:`, `retry:` and comments.
#[derive(Default)]
pub struct SseParser {
    line: Vec<u8>,
    data: Option<String>,
}

impl SseParser {
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut events = Vec::new();
        for &byte in bytes {
            if byte != b'\n' {
                self.line.push(byte);
                continue;
            }
            if self.line.last() == Some(&b'\r') {
                self.line.pop();
            }
            let line = std::mem::take(&mut self.line);
            if line.is_empty() {
                events.extend(self.data.take());
            } else if let Some(rest) = line.strip_prefix(b"data:") {
                let rest = rest.strip_prefix(b" ").unwrap_or(rest);
                let rest = String::from_utf8_lossy(rest);
                match &mut self.data {
                    Some(data) => {
                        data.push('\n');
                        data.push_str(&rest);
                    }
                    None => self.data = Some(rest.into_owned()),
                }
            }
        }
        events
    }
}

#[cfg(test)]
mod tests {
    use super::SseParser;

    #[test]
    fn sse_events_split_across_chunks() {
        let mut parser = SseParser::default();
        assert!(parser.push(b"event: a\r\ndata: {\"x\"").is_empty());
        assert_eq!(parser.push(b":1}\r\n\r\n: ping\n\nevent: b\ndata: 2\ndata: 3\n"), vec!["{\"x\":1}"]);
        assert_eq!(parser.push(b"\n"), vec!["2\n3"]);
    }
}
