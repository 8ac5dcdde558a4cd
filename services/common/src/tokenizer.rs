//! The tokenizer of the sim model: OpenAI's o200k_base BPE (embedded in `tiktoken-rs`, so
//! nothing is fetched at run time). Loaded once per process: building it takes ~100 ms.

use std::sync::{Arc, OnceLock};

pub use tiktoken_rs::CoreBPE;

static O200K: OnceLock<Arc<CoreBPE>> = OnceLock::new();

/// Returns the process-wide o200k_base tokenizer.
pub fn o200k() -> Arc<CoreBPE> {
    O200K.get_or_init(|| Arc::new(tiktoken_rs::o200k_base().expect("embedded o200k_base loads"))).clone()
}

/// Opens a tool call in the chat format tether's templates use (Hermes style): the model
/// writes `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.
pub const TOOL_CALL_OPEN: &str = "<tool_call>";
/// Closes a tool call.
pub const TOOL_CALL_CLOSE: &str = "</tool_call>";
