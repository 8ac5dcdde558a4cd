//! Serializing Responses API events once, on the worker, and sending them to the edge.
//!
//! Every event gets the response's next `sequence_number` and, on a named lane, its
//! `stream_id`. Text and function-call argument deltas are coalesced when the edge (the
//! client) reads slower than the model writes: a delta waits while the outgoing queue is full
//! and later text of the same item joins it.

use serde::Serialize;
use serde_json::value::RawValue;
use tether_proto::worker::v1::{Event, FinalResponse, TurnEvent, turn_event};
use tokio::sync::mpsc;
use tonic::Status;

pub type TurnSink = mpsc::Sender<Result<TurnEvent, Status>>;

/// The client went away: stop producing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DeltaKind {
    /// `response.output_text.delta`.
    Text,
    /// `response.function_call_arguments.delta`.
    Arguments,
}

struct PendingDelta {
    kind: DeltaKind,
    item_id: String,
    output_index: u32,
    text: String,
}

pub struct Emitter {
    sink: TurnSink,
    sequence: u32,
    stream_id: Option<String>,
    /// Only the final response is wanted (non-streaming HTTP): skip intermediate events.
    final_only: bool,
    pending: Option<PendingDelta>,
    sent_any: bool,
    /// The engine's time to first token, sent on the terminal event (see [`Self::engine_ttft`]).
    engine_ttft_us: u64,
    /// Completion tokens (and text) received since the last event, sent with the next one.
    progress_ids: Vec<u32>,
    progress_text: String,
}

impl Emitter {
    pub fn new(sink: TurnSink, stream_id: Option<String>, final_only: bool) -> Self {
        Emitter {
            sink,
            sequence: 0,
            stream_id,
            final_only,
            pending: None,
            sent_any: false,
            engine_ttft_us: 0,
            progress_ids: Vec::new(),
            progress_text: String::new(),
        }
    }

    /// The engine's own time to the first token (queue + prefill) of this response, carried by
    /// the terminal event so the edge can tell the router's share of the client's TTFT.
    pub fn engine_ttft(&mut self, elapsed: std::time::Duration) {
        self.engine_ttft_us = elapsed.as_micros() as u64;
    }

    /// Notes completion tokens received from the shard: they travel with the next event, so
    /// the edge always knows the tokens behind what it relayed and can continue the response
    /// on another worker (see `Resume` in the worker protocol).
    pub fn progress(&mut self, ids: &[u32], text: &str) {
        if !self.final_only {
            self.progress_ids.extend_from_slice(ids);
            self.progress_text.push_str(text);
        }
    }

    /// An event carrying the progress noted since the previous one.
    fn event(&mut self, event_type: &str, json: Vec<u8>, terminal: bool, delta_bytes: usize) -> Event {
        Event {
            event_type: event_type.into(),
            json,
            terminal,
            engine_ttft_us: if terminal { self.engine_ttft_us } else { 0 },
            progress_ids: std::mem::take(&mut self.progress_ids),
            progress_text: std::mem::take(&mut self.progress_text),
            delta_bytes: delta_bytes as u32,
        }
    }

    /// Whether intermediate events are sent (not for a non-streaming HTTP request).
    pub fn streams(&self) -> bool {
        !self.final_only
    }

    /// Whether any event of this response has been sent (after that, failures are events).
    pub fn started(&self) -> bool {
        self.sent_any
    }

    /// `{"type", "sequence_number", "stream_id"?, ...fields}`, written straight from `fields`
    /// (any value that serializes as a JSON object), with no intermediate map or copy of it.
    fn serialize(&mut self, event_type: &str, fields: &impl Serialize) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(b"{\"type\":");
        serde_json::to_writer(&mut out, event_type).expect("events serialize");
        out.extend_from_slice(b",\"sequence_number\":");
        out.extend_from_slice(self.sequence.to_string().as_bytes());
        if let Some(stream_id) = &self.stream_id {
            out.extend_from_slice(b",\"stream_id\":");
            serde_json::to_writer(&mut out, stream_id).expect("events serialize");
        }
        let header = out.len();
        out.push(b',');
        serde_json::to_writer(&mut out, fields).expect("events serialize");
        debug_assert_eq!(out.get(header + 1), Some(&b'{'), "event fields are an object");
        if out.len() == header + 3 {
            // `{}`: no fields.
            out.truncate(header);
            out.push(b'}');
        } else {
            out.remove(header + 1);
        }
        self.sequence += 1;
        out
    }

    async fn send(&mut self, event: turn_event::Kind) -> Result<(), Closed> {
        self.sent_any = true;
        self.sink.send(Ok(TurnEvent { kind: Some(event) })).await.map_err(|_| Closed)
    }

    /// Sends one event (after any pending delta); `fields` serializes as a JSON object.
    pub async fn emit(&mut self, event_type: &str, fields: impl Serialize) -> Result<(), Closed> {
        self.flush().await?;
        if self.final_only {
            return Ok(());
        }
        let json = self.serialize(event_type, &fields);
        let event = self.event(event_type, json, false, 0);
        self.send(turn_event::Kind::Event(event)).await
    }

    /// Sends the terminal event; in final-only mode, the Response object with `status`.
    pub async fn terminal(&mut self, event_type: &str, response: &RawValue, http_status: u32) -> Result<(), Closed> {
        self.flush().await?;
        if self.final_only {
            let json = response.get().as_bytes().to_vec();
            return self.send(turn_event::Kind::Final(FinalResponse { status: http_status, json })).await;
        }
        let json = self.serialize(event_type, &ResponseField { response });
        let event = self.event(event_type, json, true, 0);
        self.send(turn_event::Kind::Event(event)).await
    }

    /// Queues a text delta, sending it at once unless the outgoing queue is full.
    pub async fn text_delta(&mut self, item_id: &str, output_index: u32, delta: &str) -> Result<(), Closed> {
        self.delta(DeltaKind::Text, item_id, output_index, delta).await
    }

    /// Queues a function call's arguments delta, as [`Self::text_delta`].
    pub async fn arguments_delta(&mut self, item_id: &str, output_index: u32, delta: &str) -> Result<(), Closed> {
        self.delta(DeltaKind::Arguments, item_id, output_index, delta).await
    }

    async fn delta(&mut self, kind: DeltaKind, item_id: &str, output_index: u32, delta: &str) -> Result<(), Closed> {
        if self.final_only || delta.is_empty() {
            return Ok(());
        }
        match &mut self.pending {
            Some(pending) if pending.kind == kind && pending.item_id == item_id => pending.text.push_str(delta),
            _ => {
                self.flush().await?;
                self.pending = Some(PendingDelta { kind, item_id: item_id.into(), output_index, text: delta.into() });
            }
        }
        if self.sink.capacity() > 0 {
            self.flush().await?;
        }
        Ok(())
    }

    /// Sends the pending delta, if any.
    pub async fn flush(&mut self) -> Result<(), Closed> {
        let Some(pending) = self.pending.take() else { return Ok(()) };
        let delta_bytes = pending.text.len();
        let (event_type, content_index, logprobs) = match pending.kind {
            DeltaKind::Text => ("response.output_text.delta", Some(0), Some([])),
            DeltaKind::Arguments => ("response.function_call_arguments.delta", None, None),
        };
        let fields = DeltaFields {
            item_id: &pending.item_id,
            output_index: pending.output_index,
            content_index,
            delta: &pending.text,
            logprobs,
        };
        let json = self.serialize(event_type, &fields);
        let event = self.event(event_type, json, false, delta_bytes);
        self.send(turn_event::Kind::Event(event)).await
    }
}

/// The fields of an event that carries the Response object (`response.created`, the terminal
/// events): the object serialized once, spliced into each event that carries it.
#[derive(Serialize)]
pub struct ResponseField<'a> {
    pub response: &'a RawValue,
}

/// The fields of an event about one output item (`response.output_item.added` / `.done`),
/// borrowed.
#[derive(Serialize)]
pub struct OutputItemField<'a> {
    pub output_index: u32,
    pub item: &'a serde_json::Value,
}

/// The fields of a text or arguments delta event, as the protocol writes them.
#[derive(Serialize)]
struct DeltaFields<'a> {
    item_id: &'a str,
    output_index: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    content_index: Option<u32>,
    delta: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    logprobs: Option<[(); 0]>,
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};
    use tether_proto::worker::v1::turn_event::Kind;
    use tokio::sync::mpsc;

    use super::Emitter;

    #[tokio::test]
    async fn a_text_delta_has_the_protocol_fields() {
        let (tx, mut rx) = mpsc::channel(4);
        let mut emitter = Emitter::new(tx, Some("lane-1".into()), false);
        emitter.text_delta("msg_1", 2, "h\u{e9}llo \"x\"").await.unwrap();
        let Some(Ok(event)) = rx.recv().await else { panic!("an event") };
        let Some(Kind::Event(event)) = event.kind else { panic!("an event") };
        assert_eq!(event.delta_bytes, "h\u{e9}llo \"x\"".len() as u32);
        assert_eq!(
            serde_json::from_slice::<Value>(&event.json).unwrap(),
            json!({"type": "response.output_text.delta", "sequence_number": 0, "stream_id": "lane-1",
                   "item_id": "msg_1", "output_index": 2, "content_index": 0, "delta": "h\u{e9}llo \"x\"",
                   "logprobs": []})
        );
    }

    #[tokio::test]
    async fn events_carry_type_sequence_lane_then_their_fields() {
        let (tx, mut rx) = mpsc::channel(4);
        let mut emitter = Emitter::new(tx, Some("lane-1".into()), false);
        let item = json!({"id": "fc_1", "type": "function_call"});
        emitter
            .emit("response.output_item.added", super::OutputItemField { output_index: 3, item: &item })
            .await
            .unwrap();
        emitter.emit("response.queued", json!({})).await.unwrap();
        let received = |event: Option<Result<tether_proto::worker::v1::TurnEvent, _>>| -> String {
            let Some(Kind::Event(event)) = event.unwrap().unwrap().kind else { panic!("an event") };
            String::from_utf8(event.json).unwrap()
        };
        assert_eq!(
            received(rx.recv().await),
            r#"{"type":"response.output_item.added","sequence_number":0,"stream_id":"lane-1","output_index":3,"item":{"id":"fc_1","type":"function_call"}}"#
        );
        assert_eq!(received(rx.recv().await), r#"{"type":"response.queued","sequence_number":1,"stream_id":"lane-1"}"#);
    }

    #[tokio::test]
    async fn argument_deltas_coalesce_while_the_queue_is_full() {
        let (tx, mut rx) = mpsc::channel(1);
        let mut emitter = Emitter::new(tx, None, false);
        emitter.emit("response.output_item.added", json!({"output_index": 0})).await.unwrap();
        for piece in ["{\"a\"", ":1", "}"] {
            emitter.arguments_delta("fc_1", 0, piece).await.unwrap();
        }
        let received = |event: Option<Result<tether_proto::worker::v1::TurnEvent, _>>| -> Value {
            let Some(Kind::Event(event)) = event.unwrap().unwrap().kind else { panic!("an event") };
            serde_json::from_slice(&event.json).unwrap()
        };
        assert_eq!(received(rx.recv().await)["type"], "response.output_item.added");
        emitter.flush().await.unwrap();
        let delta = received(rx.recv().await);
        assert_eq!(
            delta,
            json!({"type": "response.function_call_arguments.delta", "sequence_number": 1,
                   "item_id": "fc_1", "output_index": 0, "delta": "{\"a\":1}"})
        );
    }
}
