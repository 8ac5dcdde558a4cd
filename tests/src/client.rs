//! Test clients: a WebSocket client with a timeout on every receive, and request helpers.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const RECV_LIMIT: Duration = Duration::from_secs(10);

pub struct WsClient {
    stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// What the server sent that is not a JSON event.
#[derive(Debug)]
pub enum Received {
    Event(Value),
    Closed(Option<CloseFrame>),
}

impl WsClient {
    pub async fn connect(url: &str, key: Option<&str>) -> Result<Self, tungstenite::Error> {
        let auth = key.map(|key| format!("Bearer {key}"));
        Self::connect_with(url, auth.as_deref().map(|auth| ("authorization", auth)).as_slice()).await
    }

    /// Connects with extra headers on the upgrade request (`authorization`, `traceparent`).
    pub async fn connect_with(url: &str, headers: &[(&'static str, &str)]) -> Result<Self, tungstenite::Error> {
        let mut request = url.into_client_request()?;
        for (name, value) in headers {
            request.headers_mut().insert(*name, value.parse().unwrap());
        }
        let (stream, _) = tokio::time::timeout(RECV_LIMIT, tokio_tungstenite::connect_async(request))
            .await
            .expect("websocket handshake within the limit")?;
        Ok(WsClient { stream })
    }

    pub async fn send(&mut self, event: &Value) {
        self.send_raw(&event.to_string()).await;
    }

    pub async fn send_raw(&mut self, text: &str) {
        self.stream.send(Message::Text(text.into())).await.expect("send a frame");
    }

    pub async fn send_message(&mut self, message: Message) -> Result<(), tungstenite::Error> {
        self.stream.send(message).await
    }

    /// Receives the next event or the close, within [`RECV_LIMIT`].
    pub async fn receive(&mut self) -> Received {
        loop {
            let message =
                tokio::time::timeout(RECV_LIMIT, self.stream.next()).await.expect("a server message within the limit");
            match message {
                Some(Ok(Message::Text(text))) => {
                    return Received::Event(serde_json::from_str(&text).expect("events are JSON"));
                }
                Some(Ok(Message::Binary(bytes))) => {
                    return Received::Event(serde_json::from_slice(&bytes).expect("events are JSON"));
                }
                Some(Ok(Message::Close(frame))) => return Received::Closed(frame),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Received::Closed(None),
            }
        }
    }

    /// Receives the next event; panics on a close.
    pub async fn recv(&mut self) -> Value {
        match self.receive().await {
            Received::Event(event) => event,
            Received::Closed(frame) => panic!("connection closed while an event was expected: {frame:?}"),
        }
    }

    /// Collects events until a terminal event or an `error`.
    pub async fn until_terminal(&mut self) -> Vec<Value> {
        let mut events = Vec::new();
        loop {
            let event = self.recv().await;
            let done = is_terminal(&event);
            events.push(event);
            if done {
                return events;
            }
        }
    }

    /// Sends a `response.create` and collects its events.
    pub async fn create(&mut self, body: Value) -> Vec<Value> {
        let mut event = json!({"type": "response.create"});
        event.as_object_mut().unwrap().extend(body.as_object().expect("an object").clone());
        self.send(&event).await;
        self.until_terminal().await
    }
}

pub fn is_terminal(event: &Value) -> bool {
    matches!(event["type"].as_str(), Some("response.completed" | "response.failed" | "response.incomplete" | "error"))
}

/// The response object of the terminal event.
pub fn final_response(events: &[Value]) -> &Value {
    let last = events.last().expect("some events");
    assert!(last["type"] != "error", "expected a response, got {last}");
    &last["response"]
}

/// A function tool with a schema that has required properties.
pub fn run_tests_tool() -> Value {
    json!({
        "type": "function",
        "name": "run_tests",
        "description": "Runs the test suite",
        "parameters": {
            "type": "object",
            "properties": {"path": {"type": "string"}, "verbose": {"type": "boolean"}, "shard": {"type": "integer"}},
            "required": ["path", "verbose"],
            "additionalProperties": false
        },
        "strict": true
    })
}

/// The function calls in a response's output.
pub fn function_calls(response: &Value) -> Vec<&Value> {
    response["output"]
        .as_array()
        .map(|o| o.iter().filter(|i| i["type"] == "function_call").collect())
        .unwrap_or_default()
}

pub fn cached_tokens(response: &Value) -> u64 {
    response["usage"]["input_tokens_details"]["cached_tokens"].as_u64().expect("usage.cached_tokens")
}

/// The text of a response's message items.
pub fn output_text(response: &Value) -> String {
    response["output"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|item| item["type"] == "message")
        .flat_map(|item| item["content"].as_array().cloned().unwrap_or_default())
        .filter_map(|part| part["text"].as_str().map(str::to_owned))
        .collect()
}
