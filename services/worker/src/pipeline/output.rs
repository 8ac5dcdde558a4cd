//! Turns the model's streamed text into output items and their events.
//!
//! Text becomes a `message` item streamed as deltas. A `<tool_call>{...}</tool_call>` span
//! becomes a `function_call` item, but only when its body parses as a call; anything else
//! stays text, so a call the model did not make is never fabricated. Text that might be the
//! start of a tool call tag is held back until it is known not to be one.

use serde_json::{Value, json};
use tether_common::ids::item_id;
use tether_common::tokenizer::{TOOL_CALL_CLOSE, TOOL_CALL_OPEN};

use crate::api::events::{Closed, Emitter};
use crate::api::items::{Item, Role};

struct OpenMessage {
    id: String,
    output_index: u32,
    text: String,
}

#[derive(Default)]
pub struct OutputBuilder {
    buffer: String,
    in_call: bool,
    message: Option<OpenMessage>,
    /// Whitespace seen before any message opened (kept if text follows).
    leading_space: String,
    /// Finalized output items, as JSON for the Response and as items for the state.
    pub output: Vec<Value>,
    pub items: Vec<Item>,
}

impl OutputBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Consumes a piece of generated text.
    pub async fn push(&mut self, emitter: &mut Emitter, text: &str) -> Result<(), Closed> {
        self.buffer.push_str(text);
        loop {
            if self.in_call {
                let Some(end) = self.buffer.find(TOOL_CALL_CLOSE) else { return Ok(()) };
                let body: String = self.buffer.drain(..end + TOOL_CALL_CLOSE.len()).collect();
                let body = &body[..end];
                self.in_call = false;
                match parse_call(body) {
                    Some((name, arguments)) => {
                        self.close_message(emitter, "completed").await?;
                        self.function_call(emitter, name, arguments).await?;
                    }
                    None => self.text(emitter, &format!("{TOOL_CALL_OPEN}{body}{TOOL_CALL_CLOSE}")).await?,
                }
            } else if let Some(start) = self.buffer.find(TOOL_CALL_OPEN) {
                let before: String = self.buffer.drain(..start + TOOL_CALL_OPEN.len()).collect();
                self.text(emitter, &before[..start]).await?;
                self.in_call = true;
            } else {
                let keep = held_back(&self.buffer);
                let ready: String = self.buffer.drain(..self.buffer.len() - keep).collect();
                return self.text(emitter, &ready).await;
            }
        }
    }

    /// Flushes what is left; `status` is the final status of an open message.
    ///
    /// A call still open when generation stops early (`incomplete`: `max_output_tokens` cut it,
    /// or the turn failed) is dropped: its arguments are not complete JSON, so it is no call,
    /// and its markup is the model's syntax, never answer text. A call the model left open at
    /// a natural stop stays text, as any malformed call does.
    pub async fn finish(&mut self, emitter: &mut Emitter, status: &str) -> Result<(), Closed> {
        let rest = std::mem::take(&mut self.buffer);
        let rest = match (self.in_call, status) {
            (true, "completed") => format!("{TOOL_CALL_OPEN}{rest}"),
            (true, _) => String::new(),
            (false, "completed") => rest,
            // Held-back bytes that may begin a tag: a cut tag is markup too.
            (false, _) if TOOL_CALL_OPEN.starts_with(rest.as_str()) => String::new(),
            (false, _) => rest,
        };
        self.in_call = false;
        self.text(emitter, &rest).await?;
        self.close_message(emitter, status).await
    }

    fn next_index(&self) -> u32 {
        self.output.len() as u32 + u32::from(self.message.is_some())
    }

    async fn text(&mut self, emitter: &mut Emitter, text: &str) -> Result<(), Closed> {
        if text.is_empty() {
            return Ok(());
        }
        if self.message.is_none() {
            if text.trim().is_empty() {
                self.leading_space.push_str(text);
                return Ok(());
            }
            let message = OpenMessage { id: item_id("msg"), output_index: self.next_index(), text: String::new() };
            emitter
                .emit("response.output_item.added", json!({
                    "output_index": message.output_index,
                    "item": {"type": "message", "id": message.id, "status": "in_progress", "role": "assistant", "content": []},
                }))
                .await?;
            emitter
                .emit(
                    "response.content_part.added",
                    json!({
                        "item_id": message.id, "output_index": message.output_index, "content_index": 0,
                        "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []},
                    }),
                )
                .await?;
            self.message = Some(message);
        }
        let message = self.message.as_mut().expect("opened above");
        let delta = if self.leading_space.is_empty() {
            text.to_owned()
        } else {
            std::mem::take(&mut self.leading_space) + text
        };
        message.text.push_str(&delta);
        let (id, index) = (message.id.clone(), message.output_index);
        emitter.text_delta(&id, index, &delta).await
    }

    async fn close_message(&mut self, emitter: &mut Emitter, status: &str) -> Result<(), Closed> {
        self.leading_space.clear();
        let Some(message) = self.message.take() else { return Ok(()) };
        let part = json!({"type": "output_text", "text": message.text, "annotations": [], "logprobs": []});
        let common = |extra: Value| {
            let mut fields = json!({"item_id": message.id, "output_index": message.output_index, "content_index": 0});
            fields.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            fields
        };
        emitter.emit("response.output_text.done", common(json!({"text": message.text, "logprobs": []}))).await?;
        emitter.emit("response.content_part.done", common(json!({"part": part}))).await?;
        let item =
            json!({"type": "message", "id": message.id, "status": status, "role": "assistant", "content": [part]});
        emitter.emit("response.output_item.done", json!({"output_index": message.output_index, "item": item})).await?;
        self.output.push(item);
        self.items.push(Item::Message { role: Role::Assistant, text: message.text });
        Ok(())
    }

    async fn function_call(&mut self, emitter: &mut Emitter, name: String, arguments: String) -> Result<(), Closed> {
        let (id, call_id, output_index) = (item_id("fc"), item_id("call"), self.next_index());
        let item = |status: &str, arguments: &str| json!({"type": "function_call", "id": id, "call_id": call_id, "name": name, "arguments": arguments, "status": status});
        emitter
            .emit("response.output_item.added", json!({"output_index": output_index, "item": item("in_progress", "")}))
            .await?;
        emitter
            .emit(
                "response.function_call_arguments.delta",
                json!({"item_id": id, "output_index": output_index, "delta": arguments}),
            )
            .await?;
        emitter
            .emit(
                "response.function_call_arguments.done",
                json!({"item_id": id, "output_index": output_index, "arguments": arguments}),
            )
            .await?;
        let done = item("completed", &arguments);
        emitter.emit("response.output_item.done", json!({"output_index": output_index, "item": done})).await?;
        self.output.push(done);
        self.items.push(Item::FunctionCall { id, call_id, name, arguments });
        Ok(())
    }
}

/// Parses a tool call body: `{"name": "...", "arguments": {...} | "..."}`.
fn parse_call(body: &str) -> Option<(String, String)> {
    let value: Value = serde_json::from_str(body.trim()).ok()?;
    let name = value.get("name")?.as_str()?.to_owned();
    let arguments = match value.get("arguments") {
        Some(Value::String(text)) => text.clone(),
        Some(object @ Value::Object(_)) => object.to_string(),
        None => "{}".to_owned(),
        Some(_) => return None,
    };
    Some((name, arguments))
}

/// How many trailing bytes of `text` could begin a tool call tag.
fn held_back(text: &str) -> usize {
    (1..TOOL_CALL_OPEN.len().min(text.len() + 1))
        .rev()
        .find(|&n| text.is_char_boundary(text.len() - n) && TOOL_CALL_OPEN.starts_with(&text[text.len() - n..]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use tokio::sync::mpsc;

    use super::{OutputBuilder, held_back};
    use crate::api::events::Emitter;
    use crate::api::items::Item;

    async fn run(pieces: &[&str]) -> (OutputBuilder, Vec<String>) {
        run_to(pieces, "completed").await
    }

    async fn run_to(pieces: &[&str], status: &str) -> (OutputBuilder, Vec<String>) {
        let (tx, mut rx) = mpsc::channel(1024);
        let mut emitter = Emitter::new(tx, None, false);
        let mut builder = OutputBuilder::new();
        for piece in pieces {
            builder.push(&mut emitter, piece).await.unwrap();
        }
        builder.finish(&mut emitter, status).await.unwrap();
        drop(emitter);
        let mut types = Vec::new();
        while let Some(Ok(event)) = rx.recv().await {
            if let Some(tether_proto::worker::v1::turn_event::Kind::Event(event)) = event.kind {
                types.push(event.event_type);
            }
        }
        (builder, types)
    }

    #[tokio::test]
    async fn text_then_a_call_split_across_pieces() {
        let (builder, types) =
            run(&["Let me", " check. <tool", "_call>{\"name\":\"run\",", "\"arguments\":{\"a\":1}}</tool_call>"]).await;
        assert_eq!(builder.items.len(), 2);
        assert!(matches!(&builder.items[0], Item::Message { text, .. } if text == "Let me check. "));
        assert!(
            matches!(&builder.items[1], Item::FunctionCall { name, arguments, .. } if name == "run" && arguments == "{\"a\":1}")
        );
        assert_eq!(builder.output[1]["status"], "completed");
        assert_eq!(types.first().unwrap(), "response.output_item.added");
        assert!(types.contains(&"response.function_call_arguments.done".to_owned()));
    }

    #[tokio::test]
    async fn a_malformed_call_stays_text() {
        let (builder, _) = run(&["<tool_call>not json</tool_call>"]).await;
        assert!(
            matches!(&builder.items[..], [Item::Message { text, .. }] if text == "<tool_call>not json</tool_call>")
        );
        let (builder, _) = run(&["<tool_call>{\"name\":\"x\""]).await;
        assert!(matches!(&builder.items[..], [Item::Message { .. }]), "an unterminated call is text");
    }

    #[tokio::test]
    async fn a_call_cut_by_the_token_limit_leaks_no_markup() {
        for pieces in [&["<tool_call>{\"name\":\"run\",\"argu"][..], &["<tool"], &["<tool_call>"]] {
            let (builder, types) = run_to(pieces, "incomplete").await;
            assert!(builder.items.is_empty() && builder.output.is_empty(), "{pieces:?}");
            assert!(types.is_empty(), "no event for a cut call: {types:?}");
        }
        let (builder, _) = run_to(&["Checking. <tool_call>{\"name\":"], "incomplete").await;
        assert!(matches!(&builder.items[..], [Item::Message { text, .. }] if text == "Checking. "));
        assert_eq!(builder.output[0]["status"], "incomplete");
    }

    #[test]
    fn holds_back_a_possible_tag_prefix() {
        assert_eq!(held_back("abc <tool"), 5);
        assert_eq!(held_back("abc"), 0);
        assert_eq!(held_back("<"), 1);
        assert_eq!(held_back("é"), 0);
    }
}
