//! `text.format`: what shape a text answer takes (plain text, some JSON object, or JSON that
//! validates against a schema), validated field by field with the `param` OpenAI names.

use serde_json::{Map, Value};
use tether_common::limits;

use crate::error::WorkerError;

#[derive(Clone, Debug, Default, PartialEq)]
pub enum TextFormat {
    #[default]
    Text,
    JsonObject,
    JsonSchema {
        name: String,
        schema: Value,
        strict: bool,
    },
}

impl TextFormat {
    /// Whether the answer must be JSON (only an engine that can constrain its output serves it).
    pub fn is_json(&self) -> bool {
        *self != TextFormat::Text
    }
}

/// Parses the request's `text` field (absent or null: plain text).
pub fn parse(text: Option<&Value>) -> Result<TextFormat, WorkerError> {
    let text = match text {
        None | Some(Value::Null) => return Ok(TextFormat::Text),
        Some(Value::Object(text)) => text,
        Some(_) => return Err(WorkerError::invalid("text", "'text' must be an object.")),
    };
    let format = match text.get("format") {
        None | Some(Value::Null) => return Ok(TextFormat::Text),
        Some(Value::Object(format)) => format,
        Some(_) => return Err(WorkerError::invalid("text.format", "'text.format' must be an object.")),
    };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(TextFormat::Text),
        Some("json_object") => Ok(TextFormat::JsonObject),
        Some("json_schema") => json_schema(format),
        Some(other) => Err(WorkerError::invalid(
            "text.format.type",
            format!("Invalid value: '{other}'. Supported values are: 'text', 'json_object' and 'json_schema'."),
        )),
        None => Err(WorkerError::invalid(
            "text.format.type",
            "'text.format.type' is required: 'text', 'json_object' or 'json_schema'.",
        )),
    }
}

fn json_schema(format: &Map<String, Value>) -> Result<TextFormat, WorkerError> {
    let name = match format.get("name") {
        Some(Value::String(name))
            if (1..=64).contains(&name.len())
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') =>
        {
            name.clone()
        }
        None | Some(Value::Null) => {
            return Err(WorkerError::invalid("text.format.name", "Missing required parameter: 'text.format.name'."));
        }
        Some(_) => {
            return Err(WorkerError::invalid(
                "text.format.name",
                "'text.format.name' must be 1-64 characters of letters, digits, underscores and hyphens.",
            ));
        }
    };
    let schema = match format.get("schema") {
        Some(schema @ Value::Object(_)) => schema.clone(),
        None | Some(Value::Null) => {
            return Err(WorkerError::invalid(
                "text.format.schema",
                "Missing required parameter: 'text.format.schema'.",
            ));
        }
        Some(_) => {
            return Err(WorkerError::invalid(
                "text.format.schema",
                "'text.format.schema' must be a JSON Schema object.",
            ));
        }
    };
    // Serialized size bounds the schema's depth and breadth (the engine walks it).
    if serde_json::to_vec(&schema).map_or(usize::MAX, |bytes| bytes.len()) > limits::TOOL_DEFINITION_BYTES {
        return Err(WorkerError::invalid(
            "text.format.schema",
            format!("'text.format.schema' is larger than {} bytes.", limits::TOOL_DEFINITION_BYTES),
        ));
    }
    // A schema no validator can compile (a wrong keyword type, a reference to nothing) is the
    // client's error, named here rather than failing the turn in the engine.
    if let Err(error) = jsonschema::options().build(&schema) {
        return Err(WorkerError::invalid(
            "text.format.schema",
            format!("Invalid schema for response_format '{name}': {error}"),
        ));
    }
    let strict = match format.get("strict") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(strict)) => *strict,
        Some(_) => return Err(WorkerError::invalid("text.format.strict", "'text.format.strict' must be a boolean.")),
    };
    if format.get("description").is_some_and(|d| !d.is_string() && !d.is_null()) {
        return Err(WorkerError::invalid("text.format.description", "'text.format.description' must be a string."));
    }
    Ok(TextFormat::JsonSchema { name, schema, strict })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{TextFormat, parse};

    #[test]
    fn formats_parse() {
        assert_eq!(parse(None).unwrap(), TextFormat::Text);
        assert_eq!(parse(Some(&json!({"verbosity":"low"}))).unwrap(), TextFormat::Text);
        assert_eq!(parse(Some(&json!({"format":{"type":"text"}}))).unwrap(), TextFormat::Text);
        assert_eq!(parse(Some(&json!({"format":{"type":"json_object"}}))).unwrap(), TextFormat::JsonObject);
        let format = json!({"format":{"type":"json_schema","name":"Person","strict":true,
                                      "schema":{"type":"object","properties":{"a":{"type":"string"}}}}});
        let TextFormat::JsonSchema { name, strict, schema } = parse(Some(&format)).unwrap() else { panic!() };
        assert_eq!((name.as_str(), strict, schema["type"].as_str()), ("Person", true, Some("object")));
    }

    #[test]
    fn malformed_formats_name_their_param() {
        let schema = json!({"type":"object"});
        for (text, param) in [
            (json!("json"), "text"),
            (json!({"format":"json"}), "text.format"),
            (json!({"format":{}}), "text.format.type"),
            (json!({"format":{"type":"yaml"}}), "text.format.type"),
            (json!({"format":{"type":"json_schema","schema":schema}}), "text.format.name"),
            (json!({"format":{"type":"json_schema","name":"has space","schema":schema}}), "text.format.name"),
            (json!({"format":{"type":"json_schema","name":"x"}}), "text.format.schema"),
            (json!({"format":{"type":"json_schema","name":"x","schema":"{}"}}), "text.format.schema"),
            (json!({"format":{"type":"json_schema","name":"x","schema":{"type":12}}}), "text.format.schema"),
            (
                json!({"format":{"type":"json_schema","name":"x","schema":{"$ref":"#/$defs/Nope"}}}),
                "text.format.schema",
            ),
            (json!({"format":{"type":"json_schema","name":"x","schema":schema,"strict":"yes"}}), "text.format.strict"),
        ] {
            let api = parse(Some(&text)).unwrap_err().api_error();
            assert_eq!((api.status, api.r#type.as_str(), api.param.as_str()), (400, "invalid_request_error", param));
        }
    }
}
