//! One WebSocket connection: read client events, check their envelope, queue creates on
//! their lanes, run up to 16 at once and write every event as one text message.
//!
//! The read half is polled all the time, also while responses stream, so pings are
//! answered promptly. A bad frame gets an `error` event and the connection stays usable.
//! At the lifetime limit new creates are refused, in-flight ones finish, then it closes
//! with 1000; when the edge drains it closes with 1012 (service restart: the SDK may reconnect)
//! at an idle moment, never mid-response.
//!
//! Bounds: creates waiting on their lanes are capped by count and bytes (`--ws-max-queued`,
//! `--ws-max-queued-bytes`; past them an `error` event, the connection stays usable); each
//! turn holds a [`TurnGuard`](crate::admission::TurnGuard), released on drop, also when the
//! connection aborts its tasks; a client that reads nothing for `--client-read-timeout` while
//! events wait is cut off, which cancels its responses and frees their slots.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::ws::{CloseFrame, Message, WebSocket, close_code};
use futures_util::{SinkExt, StreamExt};
use tether_common::SessionKey;
use tether_proto::worker::v1::{ApiError, Delivery, ReleaseConnectionRequest, Transport, TurnRequest};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::Instrument;

use super::lanes::{LaneKey, Lanes};
use crate::admission::{ConnectionGuard, Limit, Outcome};
use crate::envelope::Envelope;
use crate::error::{api_error, invalid, ws_error_event};
use crate::metrics as m;
use crate::relay::{self, RelayItem};
use crate::state::{EdgeState, request_id};

struct Create {
    body: Bytes,
    envelope: Envelope,
}

struct Connection {
    state: EdgeState,
    tenant: Arc<str>,
    key: SessionKey,
    id: u64,
    out: mpsc::Sender<Message>,
    done: mpsc::UnboundedSender<LaneKey>,
    lanes: Lanes<Create>,
    tasks: JoinSet<()>,
    expired: bool,
    /// The upgrade request's trace context: each turn's trace links to it.
    trace: opentelemetry::Context,
}

pub async fn run(
    socket: WebSocket,
    state: EdgeState,
    tenant: Arc<str>,
    key: SessionKey,
    _admitted: ConnectionGuard,
    trace: opentelemetry::Context,
) {
    let (mut sink, mut stream) = socket.split();
    let (out, mut out_rx) = mpsc::channel::<Message>(256);
    let read_timeout = state.config.client_read_timeout;
    let mut writer = tokio::spawn(async move {
        while let Some(message) = out_rx.recv().await {
            let mut closing = matches!(message, Message::Close(_));
            // Frames queued together go out in one write (one system call for the events a
            // worker produced at once, e.g. an item's `.done` events and `response.completed`).
            let write = async {
                sink.feed(message).await?;
                while !closing && let Ok(next) = out_rx.try_recv() {
                    closing = matches!(next, Message::Close(_));
                    sink.feed(next).await?;
                }
                sink.flush().await
            };
            match tokio::time::timeout(read_timeout, write).await {
                Ok(Ok(())) if !closing => {}
                Ok(_) => break,
                Err(_) => {
                    // The client read nothing for the whole timeout: drop the connection (a
                    // close frame could not be written either), which ends its responses.
                    tracing::debug!("websocket client read nothing within the read timeout, closing");
                    metrics::counter!(m::SLOW_CLIENTS, "transport" => "websocket").increment(1);
                    return;
                }
            }
        }
        let _ = tokio::time::timeout(read_timeout, sink.close()).await;
    });
    let mut writer_done = false;
    let (done, mut done_rx) = mpsc::unbounded_channel();
    let id = state.connection_id();
    let owner = state.workers.owner(key);
    let _active = owner.as_ref().map(|worker| worker.track());
    let mut connection = Connection {
        state: state.clone(),
        tenant,
        key,
        id,
        out,
        done,
        lanes: Lanes::default(),
        tasks: JoinSet::new(),
        expired: false,
        trace,
    };
    let lifetime = tokio::time::sleep(state.config.ws_max_lifetime);
    tokio::pin!(lifetime);
    let draining = state.draining.clone();

    let close_code = loop {
        tokio::select! {
            frame = stream.next() => match frame {
                Some(Ok(Message::Text(text))) => connection.on_frame(Bytes::from(text)).await,
                Some(Ok(Message::Binary(bytes))) => connection.on_frame(bytes).await,
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Close(_))) | None => break None,
                Some(Err(error)) => break Some(read_error_code(error)),
            },
            Some(lane) = done_rx.recv() => {
                connection.lanes.finish(&lane);
                connection.start_ready();
            }
            _ = &mut lifetime, if !connection.expired => {
                connection.expired = true;
                connection.send(ws_error_event(&limit_reached(), None)).await;
            }
            _ = draining.cancelled(), if !draining.is_cancelled() => {}
            _ = &mut writer, if !writer_done => {
                writer_done = true;
                break None;
            }
        }
        if connection.lanes.idle() {
            if connection.expired {
                break Some(close_code::NORMAL);
            }
            if draining.is_cancelled() {
                break Some(close_code::RESTART);
            }
        }
    };
    if let Some(code) = close_code {
        let _ = connection.out.send(Message::Close(Some(CloseFrame { code, reason: "".into() }))).await;
    }
    // Responses still running belong to a client that left: stop them.
    connection.tasks.abort_all();
    drop(connection.out);
    if !writer_done {
        let _ = writer.await;
    }
    if let Some(worker) = owner {
        // Forget the connection's store=false state; best effort.
        let mut client = worker.client.clone();
        tokio::spawn(async move {
            let _ = client.release_connection(ReleaseConnectionRequest { connection: id }).await;
        });
    }
}

/// The close code for a failed read: 1009 for an oversized message, else 1011.
fn read_error_code(error: axum::Error) -> u16 {
    use tokio_tungstenite::tungstenite::Error as WsError;
    match error.into_inner().downcast::<WsError>() {
        Ok(error) if matches!(*error, WsError::Capacity(_)) => close_code::SIZE,
        // RFC 6455 7.4.1: 1007 for a text message that is not UTF-8.
        Ok(error) if matches!(*error, WsError::Utf8(_)) => close_code::INVALID,
        Ok(error) if matches!(*error, WsError::Protocol(_)) => close_code::PROTOCOL,
        _ => close_code::ERROR,
    }
}

fn limit_reached() -> ApiError {
    invalid(
        "websocket_connection_limit_reached",
        "Responses websocket connection limit reached (60 minutes). Create a new websocket connection to continue.",
        "",
    )
}

impl Connection {
    async fn send(&self, text: String) {
        let _ = self.out.send(Message::Text(text.into())).await;
    }

    async fn reject(&self, error: &ApiError, stream_id: Option<&str>) {
        metrics::counter!(m::WS_CLIENT_ERRORS, "code" => code_label(&error.code)).increment(1);
        self.send(ws_error_event(error, stream_id)).await;
    }

    async fn on_frame(&mut self, body: Bytes) {
        let envelope = match Envelope::parse(&body) {
            Ok(envelope) => envelope,
            Err(rejection) => return self.reject(&rejection.error, rejection.stream_id.as_deref()).await,
        };
        match envelope.kind.as_deref() {
            Some("response.create") => {}
            Some("response.steer") => {
                let error = invalid("steering_not_supported", "Steering is not supported by this server.", "type");
                return self.reject(&error, None).await;
            }
            Some(other) => {
                let error =
                    invalid("invalid_event_type", format!("Unsupported event type '{}'.", truncate(other)), "type");
                return self.reject(&error, None).await;
            }
            None => return self.reject(&invalid("invalid_event_type", "Missing event 'type'.", "type"), None).await,
        }
        if self.expired {
            return self.reject(&limit_reached(), None).await;
        }
        let lane = envelope.stream_id.clone();
        if let Err(error) = self.state.admission.check_rate(&self.tenant) {
            return self.reject(&error, lane.as_deref()).await;
        }
        if !self.lanes.admit(&lane) {
            let error = invalid(
                "websocket_stream_limit_reached",
                "This WebSocket connection has reached its maximum number of distinct stream IDs (32). Reuse an existing stream_id or open a new WebSocket connection.",
                "stream_id",
            );
            return self.reject(&error, lane.as_deref()).await;
        }
        if self.lanes.would_queue(&lane) {
            let (queued, queued_bytes) = self.lanes.queued();
            let config = &self.state.config;
            if queued >= config.ws_max_queued || queued_bytes + body.len() > config.ws_max_queued_bytes {
                let error = self.state.admission.refused(&self.tenant, Limit::WsQueue);
                return self.reject(&error, lane.as_deref()).await;
            }
        }
        let bytes = body.len();
        self.lanes.push(lane, Create { body, envelope }, bytes);
        self.start_ready();
    }

    fn start_ready(&mut self) {
        while let Some((lane, create)) = self.lanes.next_startable() {
            let request_id = request_id();
            let span = crate::trace::ws_turn(&self.trace, &request_id);
            let connection = (self.key, self.id);
            let task =
                run_create(self.state.clone(), self.tenant.clone(), connection, create, request_id, self.out.clone())
                    .instrument(span);
            let done = self.done.clone();
            self.tasks.spawn(async move {
                task.await;
                let _ = done.send(lane);
            });
        }
        // Reap finished tasks so the set does not grow over a long connection.
        while self.tasks.try_join_next().is_some() {}
    }
}

fn truncate(text: &str) -> &str {
    let end = text.char_indices().nth(64).map_or(text.len(), |(i, _)| i);
    &text[..end]
}

fn code_label(code: &str) -> &'static str {
    match code {
        "invalid_json" => "invalid_json",
        "invalid_event_type" => "invalid_event_type",
        "invalid_stream_id" => "invalid_stream_id",
        "previous_response_not_found" => "previous_response_not_found",
        "websocket_stream_limit_reached" => "websocket_stream_limit_reached",
        "websocket_connection_limit_reached" => "websocket_connection_limit_reached",
        "rate_limit_exceeded" => "rate_limit_exceeded",
        _ => "other",
    }
}

async fn run_create(
    state: EdgeState,
    tenant: Arc<str>,
    (connection_key, connection): (SessionKey, u64),
    create: Create,
    request_id: String,
    out: mpsc::Sender<Message>,
) {
    let stream_id = create.envelope.stream_id.clone();
    let key = create.envelope.previous.as_ref().map_or(connection_key, |previous| previous.session_key());
    let send = |text: String| {
        let out = out.clone();
        async move { out.send(Message::Text(text.into())).await.is_ok() }
    };
    let mut guard = match state.admission.turn(&tenant, "websocket") {
        Ok(guard) => guard,
        Err(error) => {
            metrics::counter!(m::WS_CLIENT_ERRORS, "code" => code_label(&error.code)).increment(1);
            send(ws_error_event(&error, stream_id.as_deref())).await;
            return;
        }
    };
    let turn = TurnRequest {
        tenant: tenant.to_string(),
        session: key.0,
        body: create.body.to_vec(),
        transport: Transport::Websocket as i32,
        delivery: Delivery::Events as i32,
        stream_id: stream_id.clone().unwrap_or_default(),
        connection,
        request_id,
        resume: None,
    };
    match relay::start_routed(&state, key, turn).await {
        Err(error) => {
            guard.set_outcome(Outcome::Error);
            send(ws_error_event(&error, stream_id.as_deref())).await;
        }
        Ok(mut relay) => {
            let relayed = metrics::counter!(m::EVENTS_RELAYED);
            while let Some(item) = relay.next().await {
                guard.first_event();
                let text = match item {
                    RelayItem::Event { json, event_type, terminal, engine_ttft_us } => {
                        guard.relayed(&event_type, engine_ttft_us);
                        if terminal {
                            let failed = event_type == "response.failed";
                            guard.set_outcome(if failed { Outcome::Failed } else { Outcome::Ok });
                        }
                        match String::from_utf8(json) {
                            Ok(text) => text,
                            Err(_) => ws_error_event(
                                &api_error(500, "server_error", "server_error", "Invalid event encoding.", ""),
                                stream_id.as_deref(),
                            ),
                        }
                    }
                    RelayItem::Error(error) => {
                        guard.set_outcome(Outcome::Error);
                        ws_error_event(&error, stream_id.as_deref())
                    }
                    RelayItem::Final { .. } => continue,
                };
                relayed.increment(1);
                if !send(text).await {
                    break;
                }
            }
        }
    }
    // The guard's drop frees the slots and counts the outcome, here or when the task is
    // aborted.
}
