//! `GET /v1/responses/{id}?stream=true`: a stored Response replayed as the SSE events of §3.
//!
//! The worker keeps the final Response object, not the events that made it, so the replay is
//! rebuilt from it: `response.created` and `response.in_progress` carry the object as it was
//! when it started (no output, no usage), each output item is added, filled (its text or its
//! arguments as one delta) and done exactly as stored, and the terminal event (`completed`,
//! `incomplete` or `failed`, after the stored status) carries the stored object unchanged.
//! Sequence numbers count from 0, as on a live stream.

use serde_json::{Map, Value, json};

/// The replayed events of a stored Response, in order, each as (type, JSON).
pub fn events(response: &Value) -> Vec<(String, Value)> {
    let mut replay = Replay { events: Vec::new() };
    let mut started = response.clone();
    if let Some(object) = started.as_object_mut() {
        object.insert("status".into(), json!("in_progress"));
        object.insert("output".into(), json!([]));
        for field in ["usage", "incomplete_details", "error", "completed_at"] {
            if object.contains_key(field) {
                object.insert(field.into(), Value::Null);
            }
        }
    }
    replay.push("response.created", json!({"response": started}));
    replay.push("response.in_progress", json!({"response": started}));
    let output = response.get("output").and_then(Value::as_array).cloned().unwrap_or_default();
    for (index, item) in output.iter().enumerate() {
        replay.item(index, item);
    }
    let terminal = match response.get("status").and_then(Value::as_str) {
        Some("incomplete") => "response.incomplete",
        Some("failed") => "response.failed",
        _ => "response.completed",
    };
    replay.push(terminal, json!({"response": response}));
    replay.events
}

struct Replay {
    events: Vec<(String, Value)>,
}

impl Replay {
    fn push(&mut self, event_type: &str, fields: Value) {
        let mut object = Map::new();
        object.insert("type".into(), json!(event_type));
        object.insert("sequence_number".into(), json!(self.events.len()));
        if let Value::Object(fields) = fields {
            object.extend(fields);
        }
        self.events.push((event_type.to_owned(), Value::Object(object)));
    }

    fn item(&mut self, index: usize, item: &Value) {
        let id = item.get("id").cloned().unwrap_or(Value::Null);
        let mut added = item.clone();
        match item.get("type").and_then(Value::as_str) {
            Some("message") => {
                added["status"] = json!("in_progress");
                added["content"] = json!([]);
                self.push("response.output_item.added", json!({"output_index": index, "item": added}));
                let parts = item.get("content").and_then(Value::as_array).cloned().unwrap_or_default();
                for (content_index, part) in parts.iter().enumerate() {
                    let at = json!({"item_id": id, "output_index": index, "content_index": content_index});
                    let with = |extra: Value| {
                        let mut fields = at.clone();
                        if let (Some(fields), Value::Object(extra)) = (fields.as_object_mut(), extra) {
                            fields.extend(extra);
                        }
                        fields
                    };
                    match part.get("type").and_then(Value::as_str) {
                        Some("output_text") => {
                            let text = part.get("text").cloned().unwrap_or(json!(""));
                            let mut empty = part.clone();
                            empty["text"] = json!("");
                            self.push("response.content_part.added", with(json!({"part": empty})));
                            if text.as_str().is_some_and(|t| !t.is_empty()) {
                                self.push("response.output_text.delta", with(json!({"delta": text, "logprobs": []})));
                            }
                            self.push("response.output_text.done", with(json!({"text": text, "logprobs": []})));
                        }
                        _ => self.push("response.content_part.added", with(json!({"part": part}))),
                    }
                    self.push("response.content_part.done", with(json!({"part": part})));
                }
            }
            Some("function_call") => {
                added["status"] = json!("in_progress");
                added["arguments"] = json!("");
                self.push("response.output_item.added", json!({"output_index": index, "item": added}));
                let arguments = item.get("arguments").cloned().unwrap_or(json!(""));
                let at = |key: &str, value: &Value| json!({"item_id": id, "output_index": index, key: value});
                self.push("response.function_call_arguments.delta", at("delta", &arguments));
                self.push("response.function_call_arguments.done", at("arguments", &arguments));
            }
            _ => self.push("response.output_item.added", json!({"output_index": index, "item": added})),
        }
        self.push("response.output_item.done", json!({"output_index": index, "item": item}));
    }
}

/// The SSE body of the replay: one `event:`/`data:` frame per event.
pub fn sse_body(response: &Value) -> String {
    events(response).into_iter().map(|(event_type, data)| format!("event: {event_type}\ndata: {data}\n\n")).collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::events;

    #[test]
    fn replays_a_message_and_a_call_between_created_and_the_terminal() {
        let response = json!({
            "id": "resp_1", "object": "response", "status": "completed", "usage": {"input_tokens": 3},
            "output": [
                {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
                 "content": [{"type": "output_text", "text": "hi", "annotations": [], "logprobs": []}]},
                {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "f", "arguments": "{}", "status": "completed"},
            ],
        });
        let replay = events(&response);
        let types: Vec<&str> = replay.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(
            types,
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
                "response.completed",
            ]
        );
        assert_eq!(replay[0].1["response"]["status"], "in_progress");
        assert_eq!(replay[0].1["response"]["usage"], json!(null));
        assert_eq!(replay[4].1["delta"], "hi");
        assert_eq!(replay[12].1["response"], response);
        for (index, (_, event)) in replay.iter().enumerate() {
            assert_eq!(event["sequence_number"], index);
        }
    }
}
