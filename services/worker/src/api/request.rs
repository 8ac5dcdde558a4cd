//! The typed create request, validated field by field. Unknown fields are tolerated, as the
//! protocol asks; fields with a wrong type or value get an error naming the `param`.

use serde_json::{Map, Value};
use tether_common::limits;

use super::items::{self, Item};
use super::text_format::{self, TextFormat};
use crate::error::WorkerError;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToolChoice {
    Auto,
    None,
    Required,
    Function(String),
}

#[derive(Clone, Debug)]
pub struct CreateRequest {
    pub model: String,
    pub input: Vec<Item>,
    pub previous_response_id: Option<String>,
    pub instructions: Option<String>,
    /// Function tools as normalized objects (echoed in the Response, given to the engine).
    pub tools: Vec<Value>,
    pub tool_choice: ToolChoice,
    /// `tool_choice` as the client sent it (echoed).
    pub tool_choice_echo: Value,
    pub parallel_tool_calls: bool,
    pub max_output_tokens: Option<u32>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub store: bool,
    pub metadata: Map<String, Value>,
    pub generate: bool,
    pub prompt_cache_key: Option<String>,
    /// `truncation: "auto"`: drop the oldest items of the chain when the prompt would not fit
    /// the model's context window (`"disabled"`, the default, refuses the turn instead).
    pub truncation_auto: bool,
    /// `text.format`: the shape of a text answer (the `text` field is echoed as sent).
    pub text_format: TextFormat,
    /// Other settings echoed unchanged (text, reasoning, truncation, user, safety_identifier).
    pub echo: Map<String, Value>,
}

const ECHOED: &[&str] = &["text", "reasoning", "truncation", "user", "safety_identifier", "service_tier"];

impl CreateRequest {
    /// Parses a create body (HTTP body or the fields of a `response.create` event).
    pub fn parse(body: &[u8], default_model: &str) -> Result<Self, WorkerError> {
        let value: Value = serde_json::from_slice(body).map_err(|e| {
            WorkerError::invalid_with_code("", format!("The request body is not valid JSON: {e}"), "invalid_json")
        })?;
        let Value::Object(mut body) = value else {
            return Err(WorkerError::invalid("", "The request body must be a JSON object."));
        };
        if body.get("conversation").is_some_and(|v| !v.is_null()) {
            return Err(WorkerError::invalid("conversation", "The Conversations API is not supported by this server."));
        }
        if body.get("background").and_then(Value::as_bool) == Some(true) {
            return Err(WorkerError::invalid("background", "Background mode is not supported by this server."));
        }
        let model = match body.get("model") {
            None | Some(Value::Null) => default_model.to_owned(),
            Some(Value::String(model)) if !model.is_empty() => model.clone(),
            Some(_) => return Err(WorkerError::invalid("model", "'model' must be a non-empty string.")),
        };
        let previous_response_id = optional_string(&body, "previous_response_id")?;
        let instructions = optional_string(&body, "instructions")?;
        if instructions.as_ref().is_some_and(|text| text.chars().count() > limits::INSTRUCTIONS_CHARS) {
            return Err(WorkerError::invalid(
                "instructions",
                format!("'instructions' is longer than {} characters.", limits::INSTRUCTIONS_CHARS),
            ));
        }
        if let Some(Value::Array(items)) = body.get("input")
            && items.len() > limits::INPUT_ITEMS
        {
            return Err(WorkerError::invalid(
                "input",
                format!("'input' has {} items; at most {} are allowed.", items.len(), limits::INPUT_ITEMS),
            ));
        }
        let input = items::parse_input(body.get("input"))?;
        let tools = parse_tools(body.get("tools"))?;
        let (tool_choice, tool_choice_echo) = parse_tool_choice(body.get("tool_choice"), &tools)?;
        let parallel_tool_calls = optional_bool(&body, "parallel_tool_calls")?.unwrap_or(true);
        let max_output_tokens = match body.get("max_output_tokens") {
            None | Some(Value::Null) => None,
            Some(value) => Some(
                value.as_u64().filter(|n| (1..=u64::from(limits::MAX_OUTPUT_TOKENS)).contains(n)).ok_or_else(|| {
                    WorkerError::invalid(
                        "max_output_tokens",
                        format!("'max_output_tokens' must be an integer from 1 to {}.", limits::MAX_OUTPUT_TOKENS),
                    )
                })? as u32,
            ),
        };
        let temperature = optional_number(&body, "temperature", 0.0, 2.0)?;
        let top_p = optional_number(&body, "top_p", 0.0, 1.0)?;
        let store = optional_bool(&body, "store")?.unwrap_or(true);
        let generate = optional_bool(&body, "generate")?.unwrap_or(true);
        let metadata = parse_metadata(body.remove("metadata"))?;
        let prompt_cache_key = optional_string(&body, "prompt_cache_key")?;
        let truncation_auto = match body.get("truncation") {
            None | Some(Value::Null) => false,
            Some(Value::String(mode)) if mode == "auto" => true,
            Some(Value::String(mode)) if mode == "disabled" => false,
            Some(_) => return Err(WorkerError::invalid("truncation", "'truncation' must be 'auto' or 'disabled'.")),
        };
        let text_format = text_format::parse(body.get("text"))?;
        let echo = ECHOED.iter().filter_map(|key| body.remove(*key).map(|v| ((*key).to_owned(), v))).collect();
        Ok(CreateRequest {
            model,
            input,
            previous_response_id,
            instructions,
            tools,
            tool_choice,
            tool_choice_echo,
            parallel_tool_calls,
            max_output_tokens,
            temperature,
            top_p,
            store,
            metadata,
            generate,
            prompt_cache_key,
            truncation_auto,
            text_format,
            echo,
        })
    }
}

fn optional_string(body: &Map<String, Value>, field: &str) -> Result<Option<String>, WorkerError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(value)) => Ok(Some(value.clone())),
        Some(_) => Err(WorkerError::invalid(field, format!("'{field}' must be a string or null."))),
    }
}

fn optional_bool(body: &Map<String, Value>, field: &str) -> Result<Option<bool>, WorkerError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(value)) => Ok(Some(*value)),
        Some(_) => Err(WorkerError::invalid(field, format!("'{field}' must be a boolean."))),
    }
}

fn optional_number(body: &Map<String, Value>, field: &str, min: f64, max: f64) -> Result<Option<f64>, WorkerError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => {
            value.as_f64().filter(|v| (min..=max).contains(v)).map(Some).ok_or_else(|| {
                WorkerError::invalid(field, format!("'{field}' must be a number between {min} and {max}."))
            })
        }
    }
}

/// The sim engine's hints, read from `metadata`, and the largest value each accepts.
const SIM_HINTS: &[(&str, u32, u32)] =
    &[("tether_sim_output_tokens", 1, limits::SIM_OUTPUT_TOKENS), ("tether_sim_tool_calls", 0, limits::SIM_TOOL_CALLS)];

/// Checks `metadata` against OpenAI's limits (16 pairs, keys of at most 64 and values of at
/// most 512 characters) and the sim's hints against their ranges.
fn parse_metadata(metadata: Option<Value>) -> Result<Map<String, Value>, WorkerError> {
    let map = match metadata {
        None | Some(Value::Null) => return Ok(Map::new()),
        Some(Value::Object(map)) => map,
        Some(_) => return Err(WorkerError::invalid("metadata", "'metadata' must be an object of string values.")),
    };
    if map.len() > limits::METADATA_PAIRS {
        return Err(WorkerError::invalid(
            "metadata",
            format!("'metadata' has {} pairs; at most {} are allowed.", map.len(), limits::METADATA_PAIRS),
        ));
    }
    for (key, value) in &map {
        if key.chars().count() > limits::METADATA_KEY_CHARS {
            return Err(WorkerError::invalid(
                "metadata",
                format!("A 'metadata' key is longer than {} characters.", limits::METADATA_KEY_CHARS),
            ));
        }
        let Value::String(value) = value else {
            return Err(WorkerError::invalid(format!("metadata.{key}"), "'metadata' values must be strings."));
        };
        if value.chars().count() > limits::METADATA_VALUE_CHARS {
            return Err(WorkerError::invalid(
                format!("metadata.{key}"),
                format!("A 'metadata' value is longer than {} characters.", limits::METADATA_VALUE_CHARS),
            ));
        }
        if let Some((_, min, max)) = SIM_HINTS.iter().find(|(hint, ..)| hint == key)
            && !value.trim().parse::<u32>().is_ok_and(|n| (*min..=*max).contains(&n))
        {
            return Err(WorkerError::invalid(
                format!("metadata.{key}"),
                format!("'metadata.{key}' must be an integer from {min} to {max}."),
            ));
        }
    }
    Ok(map)
}

fn parse_tools(tools: Option<&Value>) -> Result<Vec<Value>, WorkerError> {
    let tools = match tools {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(tools)) => tools,
        Some(_) => return Err(WorkerError::invalid("tools", "'tools' must be an array.")),
    };
    if tools.len() > limits::TOOLS {
        return Err(WorkerError::invalid(
            "tools",
            format!("'tools' has {} tools; at most {} are allowed.", tools.len(), limits::TOOLS),
        ));
    }
    tools
        .iter()
        .enumerate()
        .map(|(i, tool)| {
            let param = format!("tools[{i}]");
            let object =
                tool.as_object().ok_or_else(|| WorkerError::invalid(&param, "Each tool must be an object."))?;
            // Serialized size bounds the schema's depth and breadth too (the engine and the
            // renderer walk it).
            if serde_json::to_vec(tool).map_or(usize::MAX, |bytes| bytes.len()) > limits::TOOL_DEFINITION_BYTES {
                return Err(WorkerError::invalid(
                    &param,
                    format!("A tool definition is larger than {} bytes.", limits::TOOL_DEFINITION_BYTES),
                ));
            }
            match object.get("type").and_then(Value::as_str) {
                Some("function") => {}
                Some(other) => {
                    return Err(WorkerError::invalid(
                        format!("{param}.type"),
                        format!("Tool type '{other}' is not supported by this server."),
                    ));
                }
                None => return Err(WorkerError::invalid(format!("{param}.type"), "Each tool needs a 'type'.")),
            }
            let name = object.get("name").and_then(Value::as_str).unwrap_or_default();
            let valid_name = (1..=64).contains(&name.len())
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !valid_name {
                return Err(WorkerError::invalid(
                    format!("{param}.name"),
                    "A function's 'name' must be 1-64 characters of letters, digits, underscores and hyphens.",
                ));
            }
            let parameters = match object.get("parameters") {
                None | Some(Value::Null) => Value::Null,
                Some(schema @ Value::Object(_)) => schema.clone(),
                Some(_) => {
                    return Err(WorkerError::invalid(
                        format!("{param}.parameters"),
                        "'parameters' must be a JSON Schema object.",
                    ));
                }
            };
            Ok(serde_json::json!({
                "type": "function",
                "name": name,
                "description": object.get("description").cloned().unwrap_or(Value::Null),
                "parameters": parameters,
                "strict": object.get("strict").cloned().unwrap_or(Value::Bool(true)),
            }))
        })
        .collect()
}

fn parse_tool_choice(choice: Option<&Value>, tools: &[Value]) -> Result<(ToolChoice, Value), WorkerError> {
    let parsed = match choice {
        None | Some(Value::Null) => return Ok((ToolChoice::Auto, Value::String("auto".into()))),
        Some(Value::String(mode)) => match mode.as_str() {
            "auto" => ToolChoice::Auto,
            "none" => ToolChoice::None,
            "required" => ToolChoice::Required,
            _ => {
                return Err(WorkerError::invalid(
                    "tool_choice",
                    "'tool_choice' must be 'auto', 'none', 'required' or a function.",
                ));
            }
        },
        Some(Value::Object(object)) if object.get("type").and_then(Value::as_str) == Some("function") => {
            let name = object.get("name").and_then(Value::as_str).unwrap_or_default();
            if !tools.iter().any(|tool| tool["name"] == name) {
                return Err(WorkerError::invalid(
                    "tool_choice",
                    format!("Tool choice '{name}' not found in 'tools' parameter."),
                ));
            }
            ToolChoice::Function(name.to_owned())
        }
        Some(_) => {
            return Err(WorkerError::invalid("tool_choice", "This 'tool_choice' is not supported by this server."));
        }
    };
    if parsed == ToolChoice::Required && tools.is_empty() {
        return Err(WorkerError::invalid("tool_choice", "'tool_choice' is 'required' but no tools were given."));
    }
    Ok((parsed, choice.cloned().unwrap_or(Value::Null)))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{CreateRequest, ToolChoice};

    fn parse(body: serde_json::Value) -> Result<CreateRequest, crate::error::WorkerError> {
        CreateRequest::parse(body.to_string().as_bytes(), "tether-sim")
    }

    #[test]
    fn defaults_and_echoes() {
        let request = parse(
            json!({"type":"response.create","input":"hi","stream":true,"unknown":1,"text":{"format":{"type":"text"}}}),
        )
        .unwrap();
        assert_eq!(request.model, "tether-sim");
        assert!(request.store && request.generate && request.parallel_tool_calls);
        assert_eq!(request.tool_choice, ToolChoice::Auto);
        assert!(request.echo.contains_key("text"));
        assert!(request.previous_response_id.is_none());
    }

    #[test]
    fn tool_choice_function_must_name_a_tool() {
        let tools = json!([{"type":"function","name":"f","parameters":{"type":"object"}}]);
        let ok = parse(json!({"tools": tools, "tool_choice": {"type":"function","name":"f"}})).unwrap();
        assert_eq!(ok.tool_choice, ToolChoice::Function("f".into()));
        let error = parse(json!({"tools": tools, "tool_choice": {"type":"function","name":"g"}})).unwrap_err();
        assert_eq!(error.api_error().param, "tool_choice");
    }

    #[test]
    fn bad_fields_name_their_param() {
        for (body, param) in [
            (json!({"temperature": 3}), "temperature"),
            (json!({"max_output_tokens": 0}), "max_output_tokens"),
            (json!({"store": "yes"}), "store"),
            (json!({"previous_response_id": 5}), "previous_response_id"),
            (json!({"background": true}), "background"),
            (json!({"tools": [{"type":"web_search"}]}), "tools[0].type"),
            (json!({"tools": [{"type":"function","name":"bad name"}]}), "tools[0].name"),
            (json!({"metadata": {"a": 1}}), "metadata.a"),
            (json!({"tool_choice": "required"}), "tool_choice"),
            (json!({"truncation": "sometimes"}), "truncation"),
        ] {
            assert_eq!(parse(body.clone()).unwrap_err().api_error().param, param, "{body}");
        }
        assert_eq!(CreateRequest::parse(b"[1]", "m").unwrap_err().api_error().status, 400);
    }

    #[test]
    fn every_client_size_and_count_is_capped() {
        use tether_common::limits;
        let many = |n: usize, item: serde_json::Value| serde_json::Value::Array(vec![item; n]);
        let tool = |name: &str| json!({"type":"function","name": name,"parameters":{"type":"object"}});
        let pairs = |n: usize| (0..n).map(|i| (format!("k{i}"), json!("v"))).collect::<serde_json::Map<_, _>>();
        let big_schema = json!({"type":"object","description": "d".repeat(limits::TOOL_DEFINITION_BYTES)});
        for (body, param) in [
            (json!({"input": many(limits::INPUT_ITEMS + 1, json!({"role":"user","content":"x"}))}), "input"),
            (json!({"tools": many(limits::TOOLS + 1, tool("f"))}), "tools"),
            (json!({"tools": [{"type":"function","name":"f","parameters": big_schema}]}), "tools[0]"),
            (json!({"metadata": pairs(limits::METADATA_PAIRS + 1)}), "metadata"),
            (json!({"metadata": {"k".repeat(limits::METADATA_KEY_CHARS + 1): "v"}}), "metadata"),
            (json!({"metadata": {"note": "v".repeat(limits::METADATA_VALUE_CHARS + 1)}}), "metadata.note"),
            (json!({"metadata": {"tether_sim_output_tokens": "4294967295"}}), "metadata.tether_sim_output_tokens"),
            (json!({"metadata": {"tether_sim_output_tokens": "0"}}), "metadata.tether_sim_output_tokens"),
            (json!({"metadata": {"tether_sim_tool_calls": "many"}}), "metadata.tether_sim_tool_calls"),
            (json!({"max_output_tokens": limits::MAX_OUTPUT_TOKENS + 1}), "max_output_tokens"),
            (json!({"instructions": "i".repeat(limits::INSTRUCTIONS_CHARS + 1)}), "instructions"),
        ] {
            let error = parse(body).unwrap_err();
            let api = error.api_error();
            assert_eq!((api.status, api.r#type.as_str(), api.param.as_str()), (400, "invalid_request_error", param));
        }
        // At the limits, everything is accepted.
        let body = json!({
            "input": many(limits::INPUT_ITEMS, json!({"role":"user","content":"x"})),
            "tools": many(limits::TOOLS, tool("f")),
            "metadata": pairs(limits::METADATA_PAIRS),
            "max_output_tokens": limits::MAX_OUTPUT_TOKENS,
            "instructions": "i".repeat(limits::INSTRUCTIONS_CHARS),
        });
        parse(body).unwrap();
        let hints = json!({"metadata": {
            "tether_sim_output_tokens": limits::SIM_OUTPUT_TOKENS.to_string(),
            "tether_sim_tool_calls": limits::SIM_TOOL_CALLS.to_string(),
            "k".repeat(limits::METADATA_KEY_CHARS): "v".repeat(limits::METADATA_VALUE_CHARS),
        }});
        parse(hints).unwrap();
        assert!(parse(json!({"truncation": "auto"})).unwrap().truncation_auto);
    }
}
