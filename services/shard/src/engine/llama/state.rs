//! A sequence's KV cells as bytes, to move a session to another shard.
//!
//! llama.cpp's safe in-memory API (`state_seq_get`) keeps the state opaque and the raw-bytes
//! API needs `unsafe`, which the workspace forbids (dependencies.md §4), so the bytes go
//! through a private temp file with `state_seq_save_file` / `state_seq_load_file`. The file
//! carries the tokens of the cells too, which the importer checks against the session.
//!
//! Trust: llama.cpp aborts the process (`GGML_ASSERT(nread <= state_size)`) on a truncated
//! state, so `ImportSession` must only be reachable by peer shards, never by clients, and
//! [`load`] checks the state's whole layout in Rust ([`state_format::check`]) before
//! llama.cpp reads it: a truncated or forged state is an error, never an abort.

use std::io::Write;

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::token::LlamaToken;

use crate::engine::state_format;
use crate::error::ShardError;

/// Returns the state of `seq`, whose cells hold `tokens` at positions `0..tokens.len()`.
pub fn save(ctx: &LlamaContext<'_>, seq: i32, tokens: &[u32]) -> Result<Vec<u8>, ShardError> {
    let file = tempfile::NamedTempFile::new()?;
    let tokens: Vec<LlamaToken> = tokens.iter().map(|&id| LlamaToken(id as i32)).collect();
    let written = ctx
        .state_seq_save_file(file.path(), seq, &tokens)
        .map_err(|error| ShardError::Engine(format!("saving sequence state: {error}")))?;
    let bytes = std::fs::read(file.path())?;
    debug_assert_eq!(bytes.len(), written, "llama.cpp reports the bytes it wrote");
    Ok(bytes)
}

/// Loads `state` into the empty sequence `seq`; returns the tokens its cells now hold (at
/// most `max_tokens`, else the load fails).
pub fn load(ctx: &mut LlamaContext<'_>, seq: i32, state: &[u8], max_tokens: usize) -> Result<Vec<u32>, ShardError> {
    // The models this engine runs keep no per-cell extension (that is M-RoPE's).
    state_format::check(state, max_tokens, 0)?;
    let mut file = tempfile::NamedTempFile::new()?;
    file.write_all(state)?;
    file.flush()?;
    let (tokens, _read) = ctx
        .state_seq_load_file(file.path(), seq, max_tokens)
        .map_err(|error| ShardError::IncompatibleState(format!("loading sequence state: {error}")))?;
    let tokens: Vec<u32> = tokens.iter().map(|token| token.0 as u32).collect();
    // The cells must be exactly positions 0..n: the sequence bookkeeping's invariant.
    let cells = ctx.kv_cache_seq_pos_max(seq) + 1;
    if cells != tokens.len() as i32 {
        return Err(ShardError::IncompatibleState(format!("state holds {cells} cells for {} tokens", tokens.len())));
    }
    Ok(tokens)
}
