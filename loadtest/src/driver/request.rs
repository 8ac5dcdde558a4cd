//! Request bodies of the Responses API modes (see `responses-protocol.md` §2.1 and §5).

use serde_json::{Value, json};

use super::Conversation;
use crate::config::Mode;
use crate::scenario::tool_definition;

pub fn user_message(text: &str) -> Value {
    json!({"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]})
}

pub fn function_call_output(call_id: &str, output: &str) -> Value {
    json!({"type": "function_call_output", "call_id": call_id, "output": output})
}

/// Returns the create body of this turn:
/// - `ws`: a `response.create` event with `previous_response_id` and only the new items;
/// - `http-chained`: the same as an SSE create;
/// - `http-full`: a stateless SSE create (`store:false`) with the whole history and a
///   `prompt_cache_key`, as a client doing its own state would send it;
/// - `http-full-keyless`: the same without `prompt_cache_key`.
///
/// Tools, `tool_choice` and the sim policy metadata go on every turn: they are not inherited.
pub fn create_body(mode: Mode, model: &str, conv: &Conversation<'_>) -> Value {
    let mut body = json!({
        "model": model,
        "tools": [tool_definition()],
        "tool_choice": "auto",
        "metadata": conv.plan.metadata(),
    });
    let map = body.as_object_mut().expect("body is an object");
    match mode {
        Mode::Ws | Mode::HttpChained => {
            if mode == Mode::Ws {
                map.insert("type".into(), json!("response.create"));
            } else {
                map.insert("stream".into(), json!(true));
            }
            map.insert("previous_response_id".into(), json!(conv.previous_response_id));
            map.insert("input".into(), json!(conv.new_items));
        }
        Mode::HttpFull | Mode::HttpFullKeyless | Mode::Direct | Mode::All => {
            map.insert("stream".into(), json!(true));
            map.insert("store".into(), json!(false));
            if mode != Mode::HttpFullKeyless {
                map.insert("prompt_cache_key".into(), json!(conv.key));
            }
            map.insert("input".into(), json!(conv.history));
        }
    }
    body
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{create_body, function_call_output};
    use crate::config::Mode;
    use crate::driver::Conversation;
    use crate::scenario::WorkloadConfig;

    #[test]
    fn chained_modes_send_only_new_items_and_full_sends_history() {
        let workload = WorkloadConfig {
            turns: 2,
            tool_latency: "1ms".parse().unwrap(),
            input_tokens: 20,
            tool_output_bytes: 10,
            output_tokens: 5,
            seed: 1,
        };
        let plan = workload.workflow(0);
        let mut conv = Conversation::new(&plan, Mode::Ws, 1);
        let first = create_body(Mode::Ws, "m", &conv);
        assert_eq!(first["type"], "response.create");
        assert_eq!(first["previous_response_id"], json!(null));
        assert_eq!(first["metadata"]["tether_sim_tool_calls"], "2");
        let call = json!({"type":"function_call","call_id":"call_1","name":"run_tests","arguments":"{}"});
        let reply = crate::driver::TurnReply {
            sample: Default::default(),
            response_id: Some("resp_1".into()),
            output: vec![call.clone()],
            action: crate::driver::ModelAction::ToolCall { call_id: "call_1".into() },
        };
        conv.advance(reply, "call_1".into());
        let chained = create_body(Mode::HttpChained, "m", &conv);
        assert_eq!(chained["previous_response_id"], "resp_1");
        assert_eq!(chained["input"], json!([function_call_output("call_1", &plan.tool_outputs[0])]));
        let full = create_body(Mode::HttpFull, "m", &conv);
        assert_eq!(full["store"], false);
        assert!(full.get("previous_response_id").is_none());
        assert_eq!(full["input"].as_array().unwrap().len(), 3);
        assert_eq!(full["input"][1], call);
        assert_eq!(full["prompt_cache_key"], json!(conv.key));
        let keyless = create_body(Mode::HttpFullKeyless, "m", &conv);
        assert!(keyless.get("prompt_cache_key").is_none());
        assert_eq!(keyless["input"], full["input"]);
    }
}
