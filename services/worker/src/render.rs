//! Rendering conversation items into token ids with the chat template and a real tokenizer
//! (o200k_base for the sim model, the model's own vocabulary for a llama model: see
//! [`crate::tokenizer`]).
//!
//! The template is ChatML: `<|im_start|>{role}\n{content}<|im_end|>\n`. Consecutive
//! assistant-side items (assistant messages and function calls) form one assistant block,
//! exactly as the model generated them, so rendering a history from scratch gives the same
//! ids as appending turn by turn: the stateless path still matches the shard's cached prefix.
//! Each piece (role header, content, terminator) is tokenized on its own, which keeps piece
//! boundaries stable between incremental and full rendering.

use std::sync::Arc;

use serde_json::Value;
use tether_common::tokenizer::{TOOL_CALL_CLOSE, TOOL_CALL_OPEN};
use tether_common::tokens::Fnv64;

use crate::api::items::{Item, Role};
use crate::tokenizer::{Memoized, O200k, Tokenizer};

pub struct Renderer {
    tokenizer: Arc<dyn Tokenizer>,
    open_assistant: Vec<u32>,
    close_turn: Vec<u32>,
    open_user: Vec<u32>,
    open_system: Vec<u32>,
    open_developer: Vec<u32>,
    open_tool: Vec<u32>,
}

impl Default for Renderer {
    fn default() -> Self {
        Self::new()
    }
}

impl Renderer {
    /// A renderer with o200k_base (the sim model's tokenizer).
    pub fn new() -> Self {
        Self::with_tokenizer(Arc::new(O200k::new()))
    }

    /// A renderer with `tokenizer`: markup pieces are tokenized as markup (special tokens),
    /// content as ordinary text.
    pub fn with_tokenizer(tokenizer: Arc<dyn Tokenizer>) -> Self {
        let tokenizer: Arc<dyn Tokenizer> = Arc::new(Memoized::new(tokenizer));
        let piece = |text: &str| tokenizer.encode_markup(text);
        Renderer {
            open_assistant: piece("<|im_start|>assistant\n"),
            close_turn: piece("<|im_end|>\n"),
            open_user: piece("<|im_start|>user\n"),
            open_system: piece("<|im_start|>system\n"),
            open_developer: piece("<|im_start|>developer\n"),
            open_tool: piece("<|im_start|>tool\n"),
            tokenizer,
        }
    }

    /// [`Self::header_key`] for this renderer's vocabulary (a model change renders again).
    pub fn header_key_for(&self, instructions: Option<&str>, tools: &[Value]) -> u64 {
        Self::header_key(instructions, tools) ^ self.tokenizer.key()
    }

    /// Identifies the header (instructions and tools): when it changes, the cached prefix
    /// no longer matches and the conversation is rendered from scratch.
    pub fn header_key(instructions: Option<&str>, tools: &[Value]) -> u64 {
        let mut hash = Fnv64::new();
        if let Some(instructions) = instructions {
            hash.write(&[1]);
            hash.write(instructions.as_bytes());
        }
        for tool in tools {
            hash.write(&[2]);
            hash.write(tool.to_string().as_bytes());
        }
        hash.finish()
    }

    /// Renders the system block of instructions and tool definitions (nothing if neither,
    /// unless the model's template has a default system prompt, which stands in for missing
    /// instructions).
    pub fn header(&self, instructions: Option<&str>, tools: &[Value], out: &mut Vec<u32>) {
        let instructions = instructions.or(self.tokenizer.default_system());
        if instructions.is_none() && tools.is_empty() {
            return;
        }
        out.extend_from_slice(&self.open_system);
        let mut text = instructions.unwrap_or_default().to_owned();
        if !tools.is_empty() {
            text.push_str("\n\n# Tools\nCall a function by writing <tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call>.\n");
            for tool in tools {
                text.push_str(&tool.to_string());
                text.push('\n');
            }
        }
        out.extend(self.tokenizer.encode(&text));
        out.extend_from_slice(&self.close_turn);
    }

    /// Renders `items`; `in_assistant` says whether the sequence so far ends inside an open
    /// assistant block. Returns whether the rendering ends inside one.
    pub fn items<'a>(
        &self,
        items: impl IntoIterator<Item = &'a Item>,
        mut in_assistant: bool,
        out: &mut Vec<u32>,
    ) -> bool {
        for item in items {
            let assistant_side =
                matches!(item, Item::Message { role: Role::Assistant, .. } | Item::FunctionCall { .. });
            if assistant_side && !in_assistant {
                out.extend_from_slice(&self.open_assistant);
                in_assistant = true;
            } else if !assistant_side && in_assistant {
                out.extend_from_slice(&self.close_turn);
                in_assistant = false;
            }
            match item {
                Item::Message { role: Role::Assistant, text } => out.extend(self.tokenizer.encode(text)),
                Item::FunctionCall { name, arguments, .. } => {
                    out.extend(self.tokenizer.encode(&tool_call_text(name, arguments)));
                }
                Item::Message { role, text } => {
                    out.extend_from_slice(match role {
                        Role::System => &self.open_system,
                        Role::Developer => &self.open_developer,
                        _ => &self.open_user,
                    });
                    out.extend(self.tokenizer.encode(text));
                    out.extend_from_slice(&self.close_turn);
                }
                Item::FunctionCallOutput { output, .. } => {
                    out.extend_from_slice(&self.open_tool);
                    out.extend(self.tokenizer.encode(output));
                    out.extend_from_slice(&self.close_turn);
                }
            }
        }
        in_assistant
    }

    /// Opens the assistant block the model generates into.
    pub fn generation_prompt(&self, in_assistant: bool, out: &mut Vec<u32>) {
        if !in_assistant {
            out.extend_from_slice(&self.open_assistant);
        }
    }

    /// Counts the tokens of a text (for usage of text the engine did not tokenize).
    pub fn count(&self, text: &str) -> usize {
        self.tokenizer.encode(text).len()
    }
}

/// The text of a function call in the chat format.
pub fn tool_call_text(name: &str, arguments: &str) -> String {
    let name = Value::String(name.to_owned());
    // Arguments are a JSON string; embed them as the JSON they encode when they parse.
    match serde_json::from_str::<Value>(arguments) {
        Ok(value) => format!("{TOOL_CALL_OPEN}{{\"name\":{name},\"arguments\":{value}}}{TOOL_CALL_CLOSE}"),
        Err(_) => format!(
            "{TOOL_CALL_OPEN}{{\"name\":{name},\"arguments\":{}}}{TOOL_CALL_CLOSE}",
            Value::String(arguments.to_owned())
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::Renderer;
    use crate::api::items::{Item, Role};

    fn conversation() -> Vec<Item> {
        vec![
            Item::Message { role: Role::User, text: "Fix the build.".into() },
            Item::FunctionCall {
                id: "fc_1".into(),
                call_id: "c1".into(),
                name: "run".into(),
                arguments: "{\"a\":1}".into(),
            },
            Item::FunctionCallOutput { call_id: "c1".into(), output: "3 failed".into() },
            Item::Message { role: Role::Assistant, text: " done.".into() },
        ]
    }

    #[test]
    fn turn_by_turn_equals_from_scratch() {
        let renderer = Renderer::new();
        let items = conversation();
        let mut scratch = Vec::new();
        renderer.items(&items, false, &mut scratch);

        let mut incremental = Vec::new();
        let open = renderer.items(&items[..1], false, &mut incremental);
        renderer.generation_prompt(open, &mut incremental);
        // The model generates the call inside the open assistant block.
        let open = renderer.items(&items[1..2], true, &mut incremental);
        assert!(open);
        let open = renderer.items(&items[2..3], open, &mut incremental);
        renderer.generation_prompt(open, &mut incremental);
        renderer.items(&items[3..], true, &mut incremental);
        assert_eq!(incremental, scratch);
    }

    #[test]
    fn header_key_tracks_instructions_and_tools() {
        let tools = vec![serde_json::json!({"type":"function","name":"f"})];
        assert_ne!(Renderer::header_key(Some("a"), &[]), Renderer::header_key(Some("b"), &[]));
        assert_ne!(Renderer::header_key(None, &[]), Renderer::header_key(None, &tools));
        assert_eq!(Renderer::header_key(Some("a"), &tools), Renderer::header_key(Some("a"), &tools));
    }
}
