//! Turns the model's streamed text into output items and their events.
//!
//! Text becomes a `message` item streamed as deltas. A `<tool_call>{...}</tool_call>` span
//! becomes a `function_call` item whose arguments stream as the model writes them (see
//! [`super::tool_stream`]); a span that is no call stays text, so a call the model did not
//! make is never fabricated. Text that might be the start of a tool call tag is held back
//! until it is known not to be one.
//!
//! A call is opened once its name is known. If its body then turns out malformed, the item is
//! closed `incomplete` and [`OutputBuilder::malformed_call`] tells the pipeline to fail the
//! response; a call cut by `max_output_tokens` is closed `incomplete` too. Neither is kept in
//! the conversation state: only complete calls are.

use serde_json::{Value, json};
use tether_common::ids::derived_item_id;
use tether_common::tokenizer::TOOL_CALL_OPEN;

use super::tool_stream::{CallParser, Step};
use crate::api::events::{Closed, Emitter, OutputItemField};
use crate::api::items::{Item, Role};

struct OpenMessage {
    id: String,
    output_index: u32,
    text: String,
}

struct OpenCall {
    id: String,
    call_id: String,
    name: String,
    output_index: u32,
    arguments: String,
}

#[derive(Default)]
pub struct OutputBuilder {
    /// The response's id: item ids derive from it and the item's index, so a worker that
    /// continues the response after another one names the items as the first did.
    response_id: String,
    buffer: String,
    /// The tool call span being read, if inside one.
    call: Option<CallParser>,
    message: Option<OpenMessage>,
    open_call: Option<OpenCall>,
    /// Whitespace seen before any message opened (kept if text follows).
    leading_space: String,
    /// An opened call turned out malformed.
    malformed: bool,
    /// Finalized output items, as JSON for the Response and as items for the state.
    pub output: Vec<Value>,
    pub items: Vec<Item>,
}

impl OutputBuilder {
    pub fn new(response_id: &str) -> Self {
        OutputBuilder { response_id: response_id.to_owned(), ..Self::default() }
    }

    fn item_id(&self, prefix: &str, output_index: u32) -> String {
        derived_item_id(prefix, &self.response_id, output_index)
    }

    /// Whether the model wrote a call that was opened and then turned out malformed.
    pub fn malformed_call(&self) -> bool {
        self.malformed
    }

    /// Consumes a piece of generated text.
    pub async fn push(&mut self, emitter: &mut Emitter, text: &str) -> Result<(), Closed> {
        self.buffer.push_str(text);
        loop {
            if let Some(parser) = &mut self.call {
                let steps = parser.push(&std::mem::take(&mut self.buffer));
                for step in steps {
                    self.apply(emitter, step).await?;
                }
                if self.call.is_some() {
                    return Ok(());
                }
            } else if let Some(start) = self.buffer.find(TOOL_CALL_OPEN) {
                let before: String = self.buffer.drain(..start + TOOL_CALL_OPEN.len()).collect();
                self.text(emitter, &before[..start]).await?;
                self.call = Some(CallParser::new());
            } else {
                let keep = held_back(&self.buffer);
                let ready: String = self.buffer.drain(..self.buffer.len() - keep).collect();
                return self.text(emitter, &ready).await;
            }
        }
    }

    /// Flushes what is left; `status` is the final status of an open message.
    ///
    /// A call not yet opened when generation stops early (`incomplete`: `max_output_tokens`
    /// cut it, or the turn failed) is dropped: its markup is the model's syntax, never answer
    /// text; an opened one is closed `incomplete`. A call the model left unopened at a natural
    /// stop stays text, as any span that is no call does (see [`CallParser::finish`]).
    pub async fn finish(&mut self, emitter: &mut Emitter, status: &str) -> Result<(), Closed> {
        if let Some(parser) = self.call.take() {
            for step in parser.finish(status == "completed") {
                self.apply(emitter, step).await?;
            }
        }
        self.close_call(emitter, "incomplete", false).await?;
        let rest = std::mem::take(&mut self.buffer);
        let rest = match status {
            "completed" => rest,
            // Held-back bytes that may begin a tag: a cut tag is markup too.
            _ if TOOL_CALL_OPEN.starts_with(rest.as_str()) => String::new(),
            _ => rest,
        };
        self.text(emitter, &rest).await?;
        self.close_message(emitter, status).await
    }

    async fn apply(&mut self, emitter: &mut Emitter, step: Step) -> Result<(), Closed> {
        match step {
            Step::Open { name } => self.open_call(emitter, name).await,
            Step::Arguments(delta) => self.arguments(emitter, &delta).await,
            Step::Call { name, arguments } => {
                if self.open_call.is_none() {
                    self.open_call(emitter, name).await?;
                    self.arguments(emitter, &arguments).await?;
                }
                debug_assert_eq!(self.open_call.as_ref().map(|call| call.arguments.as_str()), Some(arguments.as_str()));
                self.close_call(emitter, "completed", true).await
            }
            Step::Text(text) => self.text(emitter, &text).await,
            Step::Malformed => {
                self.malformed = true;
                self.close_call(emitter, "incomplete", false).await
            }
            Step::Cut => self.close_call(emitter, "incomplete", false).await,
            Step::End { rest } => {
                self.call = None;
                self.buffer.insert_str(0, &rest);
                Ok(())
            }
        }
    }

    fn next_index(&self) -> u32 {
        self.output.len() as u32 + u32::from(self.message.is_some() || self.open_call.is_some())
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
            let output_index = self.next_index();
            let message = OpenMessage { id: self.item_id("msg", output_index), output_index, text: String::new() };
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
        emitter
            .emit("response.output_item.done", OutputItemField { output_index: message.output_index, item: &item })
            .await?;
        self.output.push(item);
        self.items.push(Item::Message { role: Role::Assistant, text: message.text });
        Ok(())
    }

    async fn open_call(&mut self, emitter: &mut Emitter, name: String) -> Result<(), Closed> {
        self.close_message(emitter, "completed").await?;
        let output_index = self.next_index();
        let call = OpenCall {
            id: self.item_id("fc", output_index),
            call_id: self.item_id("call", output_index),
            name,
            output_index,
            arguments: String::new(),
        };
        let item = call_item(&call, "in_progress", "");
        emitter
            .emit("response.output_item.added", OutputItemField { output_index: call.output_index, item: &item })
            .await?;
        self.open_call = Some(call);
        Ok(())
    }

    async fn arguments(&mut self, emitter: &mut Emitter, delta: &str) -> Result<(), Closed> {
        let Some(call) = self.open_call.as_mut() else { return Ok(()) };
        call.arguments.push_str(delta);
        let (id, index) = (call.id.clone(), call.output_index);
        emitter.arguments_delta(&id, index, delta).await
    }

    /// Closes the open call with `status`; `keep` adds it to the conversation state.
    async fn close_call(&mut self, emitter: &mut Emitter, status: &str, keep: bool) -> Result<(), Closed> {
        let Some(call) = self.open_call.take() else { return Ok(()) };
        emitter
            .emit(
                "response.function_call_arguments.done",
                json!({"item_id": call.id, "output_index": call.output_index, "arguments": call.arguments}),
            )
            .await?;
        let done = call_item(&call, status, &call.arguments);
        emitter
            .emit("response.output_item.done", OutputItemField { output_index: call.output_index, item: &done })
            .await?;
        self.output.push(done);
        if keep {
            let OpenCall { id, call_id, name, arguments, .. } = call;
            self.items.push(Item::FunctionCall { id, call_id, name, arguments });
        }
        Ok(())
    }
}

fn call_item(call: &OpenCall, status: &str, arguments: &str) -> Value {
    json!({"type": "function_call", "id": call.id, "call_id": call.call_id, "name": call.name, "arguments": arguments, "status": status})
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
    use serde_json::Value;
    use tokio::sync::mpsc;

    use super::{OutputBuilder, held_back};
    use crate::api::events::Emitter;
    use crate::api::items::Item;

    async fn run(pieces: &[&str]) -> (OutputBuilder, Vec<String>) {
        run_to(pieces, "completed").await
    }

    async fn run_to(pieces: &[&str], status: &str) -> (OutputBuilder, Vec<String>) {
        let (builder, events) = events_to(pieces, status).await;
        (builder, events.iter().map(|event| event["type"].as_str().unwrap().to_owned()).collect())
    }

    /// Runs `pieces` through a builder; returns it and the events it sent, parsed.
    async fn events_to(pieces: &[&str], status: &str) -> (OutputBuilder, Vec<Value>) {
        let (tx, mut rx) = mpsc::channel(4096);
        let mut emitter = Emitter::new(tx, None, false);
        let mut builder = OutputBuilder::new("resp_test");
        for piece in pieces {
            builder.push(&mut emitter, piece).await.unwrap();
        }
        builder.finish(&mut emitter, status).await.unwrap();
        drop(emitter);
        let mut events = Vec::new();
        while let Some(Ok(event)) = rx.recv().await {
            if let Some(tether_proto::worker::v1::turn_event::Kind::Event(event)) = event.kind {
                events.push(serde_json::from_slice(&event.json).unwrap());
            }
        }
        (builder, events)
    }

    /// Checks the invariants of a stream of output events against the builder's output: the
    /// sequence numbers count up, each item is added, streamed and done under one
    /// `output_index` and `item_id`, argument deltas concatenate to `.done`'s arguments and
    /// the done item is the one in the output.
    fn check_stream(builder: &OutputBuilder, events: &[Value]) {
        let mut open: Option<(u64, String, String)> = None; // (output_index, id, arguments)
        let mut done_items = Vec::new();
        for (n, event) in events.iter().enumerate() {
            assert_eq!(event["sequence_number"], n as u64, "{event}");
            let index = event["output_index"].as_u64().unwrap();
            match event["type"].as_str().unwrap() {
                "response.output_item.added" => {
                    assert!(open.is_none(), "an item opened inside another: {event}");
                    assert_eq!(index, done_items.len() as u64, "{event}");
                    let id = event["item"]["id"].as_str().unwrap().to_owned();
                    open = Some((index, id, String::new()));
                }
                "response.output_item.done" => {
                    let (open_index, id, arguments) = open.take().expect("done without added");
                    assert_eq!((index, event["item"]["id"].as_str().unwrap()), (open_index, id.as_str()));
                    if event["item"]["type"] == "function_call" {
                        assert_eq!(event["item"]["arguments"], arguments.as_str());
                    }
                    done_items.push(event["item"].clone());
                }
                kind => {
                    let (open_index, id, arguments) = open.as_mut().expect("an item event outside an item");
                    assert_eq!((index, event["item_id"].as_str().unwrap()), (*open_index, id.as_str()), "{event}");
                    match kind {
                        "response.function_call_arguments.delta" => {
                            arguments.push_str(event["delta"].as_str().unwrap())
                        }
                        "response.function_call_arguments.done" => assert_eq!(event["arguments"], arguments.as_str()),
                        _ => {}
                    }
                }
            }
        }
        assert!(open.is_none(), "an item was left open");
        assert_eq!(done_items, builder.output);
    }

    fn calls(builder: &OutputBuilder) -> Vec<(&str, &str)> {
        builder
            .items
            .iter()
            .filter_map(|item| match item {
                Item::FunctionCall { name, arguments, .. } => Some((name.as_str(), arguments.as_str())),
                _ => None,
            })
            .collect()
    }

    fn kinds(events: &[Value]) -> Vec<&str> {
        events.iter().map(|event| event["type"].as_str().unwrap()).collect()
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
    async fn arguments_stream_at_every_split_point() {
        let markup = "Sure. <tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Zürich \\\"}{\\\" 東京\", \
                      \"days\": 3, \"tags\": [\"a\", {\"b\": null}]}}</tool_call> Done.";
        let arguments = "{\"city\":\"Zürich \\\"}{\\\" 東京\",\"days\":3,\"tags\":[\"a\",{\"b\":null}]}";
        let boundaries: Vec<usize> = (0..=markup.len()).filter(|&at| markup.is_char_boundary(at)).collect();
        for &split in &boundaries {
            for pieces in [vec![&markup[..split], &markup[split..]], split_chars(markup, split)] {
                let (builder, events) = events_to(&pieces, "completed").await;
                check_stream(&builder, &events);
                assert_eq!(calls(&builder), [("get_weather", arguments)], "split at {split}");
                assert!(matches!(&builder.items[0], Item::Message { text, .. } if text == "Sure. "));
                assert!(matches!(&builder.items[2], Item::Message { text, .. } if text == " Done."));
                assert_eq!(builder.output[1]["status"], "completed");
            }
        }
        // Fed a character at a time, the arguments stream a character at a time.
        let (_, events) = events_to(&split_chars(markup, markup.len()), "completed").await;
        let deltas = kinds(&events).iter().filter(|kind| **kind == "response.function_call_arguments.delta").count();
        assert_eq!(deltas, arguments.chars().count());
    }

    /// `text` a character at a time up to `split`, then the rest at once.
    fn split_chars(text: &str, split: usize) -> Vec<&str> {
        let mut pieces: Vec<&str> = text[..split].char_indices().map(|(at, c)| &text[at..at + c.len_utf8()]).collect();
        pieces.push(&text[split..]);
        pieces
    }

    #[tokio::test]
    async fn the_call_opens_before_its_arguments_end() {
        let pieces = ["<tool_call>{\"name\":\"f\",", "\"arguments\":", "{\"a\":", "\"xy", "z\"", "}}", "</tool_call>"];
        let (builder, events) = events_to(&pieces, "completed").await;
        check_stream(&builder, &events);
        assert_eq!(
            kinds(&events),
            [
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
            ]
        );
        let deltas: Vec<&str> = events[1..5].iter().map(|event| event["delta"].as_str().unwrap()).collect();
        assert_eq!(deltas, ["{\"a\":", "\"xy", "z\"", "}"]);
        assert_eq!(events[0]["item"]["arguments"], "");
        assert_eq!(events[0]["item"]["status"], "in_progress");
    }

    #[tokio::test]
    async fn two_calls_and_string_arguments() {
        let markup = "<tool_call>{\"name\":\"a\",\"arguments\":{}}</tool_call>\n<tool_call>{\"name\":\"b\",\
                      \"arguments\":\"{\\\"x\\\": \\\"\\u00e9\\\"}\"}</tool_call>";
        for split in (0..=markup.len()).filter(|&at| markup.is_char_boundary(at)) {
            let (builder, events) = events_to(&[&markup[..split], &markup[split..]], "completed").await;
            check_stream(&builder, &events);
            assert_eq!(calls(&builder), [("a", "{}"), ("b", "{\"x\": \"é\"}")], "split at {split}");
            assert_eq!(builder.output.len(), 2, "the newline between calls is no message");
        }
    }

    #[tokio::test]
    async fn other_key_orders_are_parsed_whole() {
        let (builder, events) =
            events_to(&["<tool_call>{\"arguments\": {\"a\": 1},", " \"name\": \"f\"}</tool_call>"], "completed").await;
        check_stream(&builder, &events);
        assert_eq!(calls(&builder), [("f", "{\"a\":1}")]);
        assert_eq!(kinds(&events).iter().filter(|k| **k == "response.function_call_arguments.delta").count(), 1);
    }

    #[tokio::test]
    async fn a_malformed_call_stays_text() {
        let (builder, _) = run(&["<tool_call>not json</tool_call>"]).await;
        assert!(
            matches!(&builder.items[..], [Item::Message { text, .. }] if text == "<tool_call>not json</tool_call>")
        );
        let (builder, _) = run(&["<tool_call>{\"name\":\"x\""]).await;
        assert!(matches!(&builder.items[..], [Item::Message { .. }]), "an unterminated call is text");
        assert!(!builder.malformed_call());
    }

    #[tokio::test]
    async fn a_call_that_turns_malformed_is_closed_incomplete() {
        let pieces = ["Hi <tool_call>{\"name\":\"x\",\"arguments\":{\"a\":1", "</tool_call> then text"];
        let (builder, events) = events_to(&pieces, "completed").await;
        check_stream(&builder, &events);
        assert!(builder.malformed_call());
        assert_eq!(builder.output[1]["status"], "incomplete");
        assert_eq!(builder.output[1]["arguments"], "{\"a\":1");
        assert!(calls(&builder).is_empty(), "a malformed call is not kept as a call");
        let texts: Vec<&str> = builder
            .items
            .iter()
            .filter_map(|item| if let Item::Message { text, .. } = item { Some(text.as_str()) } else { None })
            .collect();
        assert_eq!(texts, ["Hi ", " then text"], "no markup leaks as text");
        // The model stopping inside the arguments is a malformed call too.
        let (builder, events) = events_to(&["<tool_call>{\"name\":\"x\",\"arguments\":{\"a\""], "completed").await;
        check_stream(&builder, &events);
        assert!(builder.malformed_call());
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
        // Cut inside the arguments: the opened call is closed incomplete with what was streamed.
        let pieces = ["Checking. <tool_call>{\"name\":\"run\",\"arguments\":{\"path\":", "\"src/ma"];
        let (builder, events) = events_to(&pieces, "incomplete").await;
        check_stream(&builder, &events);
        assert!(!builder.malformed_call(), "a cut is no malformed call");
        assert_eq!(builder.output[0]["status"], "completed", "the message before the call was complete");
        assert_eq!(builder.output[1]["type"], "function_call");
        assert_eq!(builder.output[1]["status"], "incomplete");
        assert_eq!(builder.output[1]["arguments"], "{\"path\":\"src/ma");
        assert!(calls(&builder).is_empty(), "a cut call is not kept as a call");
    }

    #[test]
    fn holds_back_a_possible_tag_prefix() {
        assert_eq!(held_back("abc <tool"), 5);
        assert_eq!(held_back("abc"), 0);
        assert_eq!(held_back("<"), 1);
        assert_eq!(held_back("é"), 0);
    }
}
