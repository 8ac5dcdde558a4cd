//! Caps on every client-controlled size and count that reaches a worker or a shard.
//!
//! The worker refuses a request past one of these with `invalid_request_error` naming the
//! `param`, before it touches the session's state; the shard's engines apply the same caps
//! again so no client number sizes an allocation even when a worker did not check it.
//! The metadata limits are OpenAI's own (16 pairs, keys of 64 and values of 512 characters).

/// Metadata: at most this many key-value pairs.
pub const METADATA_PAIRS: usize = 16;
/// Metadata: a key is at most this many characters.
pub const METADATA_KEY_CHARS: usize = 64;
/// Metadata: a value is at most this many characters.
pub const METADATA_VALUE_CHARS: usize = 512;
/// Input items in one request.
pub const INPUT_ITEMS: usize = 2_048;
/// Function tools in one request (OpenAI's limit).
pub const TOOLS: usize = 128;
/// Bytes of one tool's definition (name, description and JSON schema, serialized).
pub const TOOL_DEFINITION_BYTES: usize = 64 * 1024;
/// Characters of `instructions`.
pub const INSTRUCTIONS_CHARS: usize = 256 * 1024;
/// `max_output_tokens`: the largest value accepted (the model's window bounds it further).
pub const MAX_OUTPUT_TOKENS: u32 = 131_072;
/// The sim hint `metadata.tether_sim_output_tokens`: the longest answer it may ask for.
pub const SIM_OUTPUT_TOKENS: u32 = 65_536;
/// The sim hint `metadata.tether_sim_tool_calls`: the most calls before an answer.
pub const SIM_TOOL_CALLS: u32 = 1_000;
