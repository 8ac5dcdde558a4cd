//! Conversation items in normalized form, parsed from the client's `input`.
//!
//! Only what rendering and replay need is kept: role and text of messages, and the fields of
//! function calls and their outputs. Unknown item types are rejected with a clear error.

use serde_json::Value;

use crate::error::WorkerError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    User,
    Assistant,
    System,
    Developer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::System => "system",
            Role::Developer => "developer",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "user" => Role::User,
            "assistant" => Role::Assistant,
            "system" => Role::System,
            "developer" => Role::Developer,
            _ => return None,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    Message { role: Role, text: String },
    FunctionCall { id: String, call_id: String, name: String, arguments: String },
    FunctionCallOutput { call_id: String, output: String },
}

impl Item {
    /// Text a safety classifier should look at (what the client supplied as content).
    pub fn checked_text(&self) -> &str {
        match self {
            Item::Message { text, .. } => text,
            Item::FunctionCall { arguments, .. } => arguments,
            Item::FunctionCallOutput { output, .. } => output,
        }
    }

    /// Approximate heap bytes, for the session cache's memory bound.
    pub fn heap_bytes(&self) -> usize {
        match self {
            Item::Message { text, .. } => text.len(),
            Item::FunctionCall { id, call_id, name, arguments } => {
                id.len() + call_id.len() + name.len() + arguments.len()
            }
            Item::FunctionCallOutput { call_id, output } => call_id.len() + output.len(),
        }
    }
}

/// Parses the `input` field: a string or an array of items.
pub fn parse_input(input: Option<&Value>) -> Result<Vec<Item>, WorkerError> {
    match input {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(text)) => Ok(vec![Item::Message { role: Role::User, text: text.clone() }]),
        Some(Value::Array(items)) => items.iter().enumerate().map(|(i, item)| parse_item(i, item)).collect(),
        Some(_) => Err(WorkerError::invalid("input", "'input' must be a string or an array of input items.")),
    }
}

fn parse_item(index: usize, item: &Value) -> Result<Item, WorkerError> {
    let param = || format!("input[{index}]");
    let object = item.as_object().ok_or_else(|| WorkerError::invalid(param(), "Each input item must be an object."))?;
    let kind = match object.get("type") {
        Some(Value::String(kind)) => kind.as_str(),
        None | Some(Value::Null) if object.contains_key("role") => "message",
        _ => return Err(WorkerError::invalid(format!("{}.type", param()), "Input item is missing a valid 'type'.")),
    };
    let string = |field: &str| -> Result<String, WorkerError> {
        match object.get(field) {
            Some(Value::String(value)) => Ok(value.clone()),
            _ => {
                Err(WorkerError::invalid(format!("{}.{field}", param()), format!("Missing required string '{field}'.")))
            }
        }
    };
    match kind {
        "message" => {
            let role = object.get("role").and_then(Value::as_str).and_then(Role::parse).ok_or_else(|| {
                WorkerError::invalid(
                    format!("{}.role", param()),
                    "'role' must be one of user, assistant, system, developer.",
                )
            })?;
            let text = content_text(object.get("content"), &format!("{}.content", param()), "content")?;
            Ok(Item::Message { role, text })
        }
        "function_call" => Ok(Item::FunctionCall {
            id: object
                .get("id")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .unwrap_or_else(|| tether_common::ids::item_id("fc")),
            call_id: string("call_id")?,
            name: string("name")?,
            arguments: string("arguments")?,
        }),
        "function_call_output" => {
            let output = match object.get("output") {
                Some(Value::String(output)) => output.clone(),
                Some(parts @ Value::Array(_)) => content_text(Some(parts), &format!("{}.output", param()), "output")?,
                _ => return Err(WorkerError::invalid(format!("{}.output", param()), "Missing required 'output'.")),
            };
            Ok(Item::FunctionCallOutput { call_id: string("call_id")?, output })
        }
        other => Err(WorkerError::invalid(
            format!("{}.type", param()),
            format!("Input item type '{other}' is not supported by this server."),
        )),
    }
}

/// Flattens message content (a string or parts with text) into text. Non-text parts (images,
/// files, audio) are not supported by the text models tether serves: they are refused with
/// `param` pointing at the part (`input[0].content[1]`).
fn content_text(content: Option<&Value>, param: &str, field: &str) -> Result<String, WorkerError> {
    let malformed = || WorkerError::invalid(param, format!("'{field}' must be a string or a list of content parts."));
    match content {
        Some(Value::String(text)) => Ok(text.clone()),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (index, part) in parts.iter().enumerate() {
                let part_param = format!("{param}[{index}]");
                let Some(kind) = part.get("type").and_then(Value::as_str) else {
                    return Err(WorkerError::invalid(
                        format!("{part_param}.type"),
                        "Each content part needs a string 'type'.",
                    ));
                };
                let field_text = |name: &str| {
                    part.get(name).and_then(Value::as_str).ok_or_else(|| {
                        WorkerError::invalid(
                            format!("{part_param}.{name}"),
                            format!("A '{kind}' part needs a string '{name}'."),
                        )
                    })
                };
                match kind {
                    "input_text" | "output_text" | "text" => text.push_str(field_text("text")?),
                    "refusal" => text.push_str(field_text("refusal")?),
                    "input_image" | "input_file" | "input_audio" => {
                        return Err(WorkerError::invalid_with_code(
                            part_param,
                            format!(
                                "Content part type '{kind}' is not supported by this model: it takes text only \
                                 ('input_text' parts or a string)."
                            ),
                            "unsupported_content",
                        ));
                    }
                    other => {
                        return Err(WorkerError::invalid(
                            format!("{part_param}.type"),
                            format!("Content part type '{other}' is not supported."),
                        ));
                    }
                }
            }
            Ok(text)
        }
        _ => Err(malformed()),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{Item, Role, parse_input};

    #[test]
    fn parses_the_shapes_the_sdk_sends() {
        let input = json!([
            {"role":"user","content":"hi"},
            {"type":"message","role":"assistant","id":"msg_1","status":"completed",
             "content":[{"type":"output_text","text":"yo","annotations":[]}]},
            {"type":"function_call","call_id":"call_1","name":"f","arguments":"{}"},
            {"type":"function_call_output","call_id":"call_1","output":"42"}
        ]);
        let items = parse_input(Some(&input)).unwrap();
        assert_eq!(items[0], Item::Message { role: Role::User, text: "hi".into() });
        assert_eq!(items[1], Item::Message { role: Role::Assistant, text: "yo".into() });
        assert!(matches!(&items[2], Item::FunctionCall { name, .. } if name == "f"));
        assert_eq!(items[3], Item::FunctionCallOutput { call_id: "call_1".into(), output: "42".into() });
        assert_eq!(parse_input(Some(&json!("x"))).unwrap().len(), 1);
    }

    #[test]
    fn rejects_bad_items_with_a_param() {
        for (bad, param) in [
            (json!(5), "input"),
            (json!([3]), "input[0]"),
            (json!([{"type":"function_call_output","output":"x"}]), "input[0].call_id"),
            (json!([{"role":"robot","content":"x"}]), "input[0].role"),
            (json!([{"type":"web_search_call"}]), "input[0].type"),
            (json!([{"role":"user","content":5}]), "input[0].content"),
            (
                json!([{"role":"user","content":[{"type":"input_text","text":"a"},{"type":"input_image"}]}]),
                "input[0].content[1]",
            ),
            (json!([{"role":"user","content":[{"type":"input_text"}]}]), "input[0].content[0].text"),
            (
                json!([{"type":"function_call_output","call_id":"c","output":[{"type":"input_file"}]}]),
                "input[0].output[0]",
            ),
        ] {
            let error = parse_input(Some(&bad)).unwrap_err();
            assert_eq!(error.api_error().param, param, "{bad}");
        }
    }
}
