//! The sim engine's tool policy: whether a turn calls a function, which one, and arguments
//! that validate against the function's JSON schema (see [`super::schema`]).

use serde_json::{Value, json};
use tether_proto::shard::v1::{ToolChoice, ToolSpec};

use super::schema::{self, Contract};
use crate::error::ShardError;

/// The engine hint: how many function calls precede the final answer under `"auto"`.
pub const HINT_TOOL_CALLS: &str = "tether_sim_tool_calls";
/// The engine hint: length of a text answer in tokens.
pub const HINT_OUTPUT_TOKENS: &str = "tether_sim_output_tokens";

/// A planned function call.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedCall {
    pub name: String,
    pub arguments: Value,
}

/// Decides whether this turn calls a function. `calls_before_answer` is the `"auto"` policy.
pub fn plan(spec: &ToolSpec, calls_before_answer: u32, seed: u64) -> Result<Option<PlannedCall>, ShardError> {
    let tools = parse_tools(&spec.tools_json)?;
    let choice = ToolChoice::try_from(spec.choice).unwrap_or(ToolChoice::Auto);
    let tool = match choice {
        ToolChoice::None => return Ok(None),
        _ if tools.is_empty() => return Ok(None),
        ToolChoice::Function => Some(
            tools
                .iter()
                .find(|tool| tool.get("name").and_then(Value::as_str) == Some(spec.function.as_str()))
                .ok_or_else(|| ShardError::UnknownFunction(spec.function.clone()))?,
        ),
        ToolChoice::Required => Some(&tools[spec.tool_outputs_seen as usize % tools.len()]),
        ToolChoice::Auto => (spec.tool_outputs_seen < calls_before_answer)
            .then(|| &tools[spec.tool_outputs_seen as usize % tools.len()]),
    };
    Ok(tool.map(|tool| PlannedCall {
        name: tool.get("name").and_then(Value::as_str).unwrap_or_default().to_owned(),
        // A function without a schema (`parameters` absent or null, as the API allows) takes an
        // object with any properties: its arguments are `{}`, never a bare value.
        arguments: match tool.get("parameters") {
            Some(schema @ Value::Object(_)) => arguments(schema, tool.get("strict") != Some(&Value::Bool(false)), seed),
            _ => json!({}),
        },
    }))
}

fn parse_tools(tools_json: &str) -> Result<Vec<Value>, ShardError> {
    if tools_json.trim().is_empty() {
        return Ok(Vec::new());
    }
    let tools: Vec<Value> = serde_json::from_str(tools_json).map_err(|e| ShardError::InvalidTools(e.to_string()))?;
    Ok(tools.into_iter().filter(|tool| tool.get("type").and_then(Value::as_str) == Some("function")).collect())
}

/// Arguments that validate against `schema`; a schema the validator cannot compile (the API
/// does not check tool schemas) gets the synthesizer's best effort.
fn arguments(schema: &Value, strict: bool, seed: u64) -> Value {
    match Contract::compile(schema, strict) {
        Ok(contract) => contract.value(seed),
        Err(_) => schema::synthesize(schema, seed, strict),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};
    use tether_proto::shard::v1::{ToolChoice, ToolSpec};

    use super::plan;
    use crate::engine::schema::synthesize;

    fn spec(choice: ToolChoice, function: &str, seen: u32) -> ToolSpec {
        let tools = json!([
            {"type":"function","name":"get_weather","parameters":{"type":"object",
              "properties":{"city":{"type":"string"},"days":{"type":"integer"},
                            "unit":{"type":"string","enum":["c","f"]},
                            "tags":{"type":"array","items":{"type":"string"}}},
              "required":["city","days"],"additionalProperties":false}},
            {"type":"function","name":"run_tests","parameters":{"type":"object","properties":{}}}
        ]);
        ToolSpec {
            tools_json: tools.to_string(),
            choice: choice as i32,
            function: function.into(),
            tool_outputs_seen: seen,
        }
    }

    #[test]
    fn auto_calls_until_the_configured_count_then_answers() {
        assert_eq!(plan(&spec(ToolChoice::Auto, "", 0), 2, 7).unwrap().unwrap().name, "get_weather");
        assert_eq!(plan(&spec(ToolChoice::Auto, "", 1), 2, 7).unwrap().unwrap().name, "run_tests");
        assert!(plan(&spec(ToolChoice::Auto, "", 2), 2, 7).unwrap().is_none());
        assert!(plan(&spec(ToolChoice::None, "", 0), 2, 7).unwrap().is_none());
        assert!(plan(&spec(ToolChoice::Required, "", 9), 0, 7).unwrap().is_some());
    }

    #[test]
    fn forced_function_gets_schema_valid_arguments() {
        let call = plan(&spec(ToolChoice::Function, "get_weather", 5), 0, 42).unwrap().unwrap();
        assert_eq!(call.name, "get_weather");
        let args = call.arguments.as_object().unwrap();
        assert!(args["city"].is_string());
        assert!(args["days"].is_u64());
        assert!(["c", "f"].contains(&args["unit"].as_str().unwrap()));
        assert!(args["tags"].as_array().unwrap().iter().all(Value::is_string));
        assert!(plan(&spec(ToolChoice::Function, "nope", 0), 0, 1).is_err());
    }

    #[test]
    fn a_function_without_a_schema_gets_an_empty_object() {
        for tool in
            [json!({"type":"function","name":"ping"}), json!({"type":"function","name":"ping","parameters":null})]
        {
            let spec = ToolSpec {
                tools_json: json!([tool]).to_string(),
                choice: ToolChoice::Required as i32,
                function: String::new(),
                tool_outputs_seen: 0,
            };
            assert_eq!(plan(&spec, 0, 7).unwrap().unwrap().arguments, json!({}), "{tool}");
        }
    }

    #[test]
    fn synthesis_is_deterministic() {
        let schema = json!({"type":"object","properties":{"a":{"type":"number"},"b":{"type":["null","boolean"]}}});
        assert_eq!(synthesize(&schema, 3, true), synthesize(&schema, 3, true));
    }
}
