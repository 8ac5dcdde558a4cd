//! The typed create request, validated field by field. Unknown fields are tolerated, as the
//! protocol asks; fields with a wrong type or value get an error naming the `param`.

use serde_json::{Map, Value};

use super::items::{self, Item};
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
        let input = items::parse_input(body.get("input"))?;
        let tools = parse_tools(body.get("tools"))?;
        let (tool_choice, tool_choice_echo) = parse_tool_choice(body.get("tool_choice"), &tools)?;
        let parallel_tool_calls = optional_bool(&body, "parallel_tool_calls")?.unwrap_or(true);
        let max_output_tokens = match body.get("max_output_tokens") {
            None | Some(Value::Null) => None,
            Some(value) => Some(value.as_u64().filter(|n| (1..=1_000_000).contains(n)).ok_or_else(|| {
                WorkerError::invalid("max_output_tokens", "'max_output_tokens' must be a positive integer.")
            })? as u32),
        };
        let temperature = optional_number(&body, "temperature", 0.0, 2.0)?;
        let top_p = optional_number(&body, "top_p", 0.0, 1.0)?;
        let store = optional_bool(&body, "store")?.unwrap_or(true);
        let generate = optional_bool(&body, "generate")?.unwrap_or(true);
        let metadata = match body.remove("metadata") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(map)) if map.len() <= 16 && map.values().all(Value::is_string) => map,
            Some(_) => {
                return Err(WorkerError::invalid(
                    "metadata",
                    "'metadata' must be an object of at most 16 string values.",
                ));
            }
        };
        let prompt_cache_key = optional_string(&body, "prompt_cache_key")?;
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

fn parse_tools(tools: Option<&Value>) -> Result<Vec<Value>, WorkerError> {
    let tools = match tools {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(tools)) => tools,
        Some(_) => return Err(WorkerError::invalid("tools", "'tools' must be an array.")),
    };
    tools
        .iter()
        .enumerate()
        .map(|(i, tool)| {
            let param = format!("tools[{i}]");
            let object =
                tool.as_object().ok_or_else(|| WorkerError::invalid(&param, "Each tool must be an object."))?;
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
            (json!({"metadata": {"a": 1}}), "metadata"),
            (json!({"tool_choice": "required"}), "tool_choice"),
        ] {
            assert_eq!(parse(body.clone()).unwrap_err().api_error().param, param, "{body}");
        }
        assert_eq!(CreateRequest::parse(b"[1]", "m").unwrap_err().api_error().status, 400);
    }
}
