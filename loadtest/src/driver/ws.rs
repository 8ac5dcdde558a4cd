//! `ws` mode: one WebSocket per agent to `ws://host/v1/responses`, one `response.create` text
//! frame per model call, events read until the response's terminal event or an `error`.
//! The socket is kept across the agent's workflows and reopened after any failed turn (its
//! remaining events would otherwise be read as the next turn's).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::events::{EventTracker, TurnReply};
use super::{Conversation, ModeContext, request};
use crate::stats::{ErrorClass, TurnError};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub struct WsAgent {
    ctx: Arc<ModeContext>,
    socket: Option<Socket>,
}

impl WsAgent {
    pub fn new(ctx: Arc<ModeContext>) -> Self {
        WsAgent { ctx, socket: None }
    }

    pub fn disconnect(&mut self) {
        // Dropping the stream closes the TCP connection; a close handshake would only add a
        // round trip to a socket that is being abandoned.
        self.socket = None;
    }

    /// Closes the socket with a close frame (the agent is done).
    pub async fn close(&mut self) {
        if let Some(mut socket) = self.socket.take() {
            let _ = tokio::time::timeout(Duration::from_secs(1), socket.close(None)).await;
        }
    }

    pub async fn ensure_connected(&mut self) -> Result<(), TurnError> {
        if self.socket.is_some() {
            return Ok(());
        }
        let target = &self.ctx.config.target;
        let mut request = target
            .ws_url
            .as_str()
            .into_client_request()
            .map_err(|e| TurnError::new(ErrorClass::Connect, e.to_string()))?;
        let bearer = HeaderValue::from_str(&format!("Bearer {}", target.api_key))
            .map_err(|_| TurnError::new(ErrorClass::Connect, "api key is not a valid header value"))?;
        request.headers_mut().insert("authorization", bearer);
        let (socket, _) =
            tokio_tungstenite::connect_async_with_config(request, None, true).await.map_err(connect_error)?;
        self.socket = Some(socket);
        Ok(())
    }

    pub async fn turn(&mut self, conv: &Conversation<'_>) -> Result<TurnReply, TurnError> {
        self.ensure_connected().await?;
        let socket = self.socket.as_mut().expect("connected above");
        let body = request::create_body(self.ctx.mode, &self.ctx.config.target.model, conv).to_string();
        let bytes_sent = body.len() as u64;
        let sent_at = Instant::now();
        socket
            .send(Message::text(body))
            .await
            .map_err(|e| TurnError::new(ErrorClass::Connect, format!("send: {e}")))?;
        let mut tracker = EventTracker::new(sent_at);
        loop {
            let message = match socket.next().await {
                Some(Ok(message)) => message,
                Some(Err(e)) => return Err(TurnError::protocol("ws_read", e.to_string())),
                None => {
                    return Err(TurnError::protocol("ws_closed", "socket ended mid-response"));
                }
            };
            let at = Instant::now();
            let payload = match &message {
                Message::Text(text) => text.as_bytes(),
                Message::Binary(bytes) => bytes.as_ref(),
                Message::Close(frame) => {
                    return Err(TurnError::protocol("ws_closed", format!("close frame {frame:?}")));
                }
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
            };
            let event = serde_json::from_slice(payload).map_err(|e| TurnError::protocol("bad_json", e.to_string()))?;
            if let Some(response) = tracker.on_event(event, at)? {
                return Ok(tracker.finish(response, at, bytes_sent));
            }
        }
    }
}

fn connect_error(error: WsError) -> TurnError {
    match error {
        WsError::Http(response) => {
            let status = response.status().as_u16();
            let code = response
                .body()
                .as_deref()
                .and_then(|body| serde_json::from_slice::<serde_json::Value>(body).ok())
                .and_then(|v| v.pointer("/error/code").and_then(|c| c.as_str()).map(str::to_owned));
            TurnError::new(ErrorClass::HttpStatus(status, code), "websocket handshake rejected")
        }
        other => TurnError::new(ErrorClass::Connect, other.to_string()),
    }
}
