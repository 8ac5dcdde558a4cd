//! The shape of a llama.cpp sequence state (`llama_state_seq_save_file`, format version 4 of
//! the vendored llama.cpp), checked in Rust before llama.cpp reads a byte of it.
//!
//! An imported state comes from the network. llama.cpp trusts its sizes: a truncated or forged
//! state makes it read past what it was given or trip a `GGML_ASSERT`, which aborts the whole
//! shard. So [`check`] walks the layout the exporter writes and refuses any state whose sizes do
//! not add up to exactly its length, whose cells are not positions `0..n` of one sequence, or
//! whose counts exceed the importer's window:
//!
//! ```text
//! u32 magic 'ggsq', u32 version, u32 n_tokens, i32 × n_tokens
//! u32 n_stream (1: one unified KV cache), u32 cell_count
//! cell_count × { i32 pos, u32 n_seq_id (1), [cell ext], i32 seq_id }
//! u32 v_trans, u32 n_layer, u32 n_rot_k, u32 n_rot_v
//! n_layer × { i32 k_type, u64 k_row_bytes, k_row_bytes × cell_count }
//! n_layer × { i32 v_type, u64 v_row_bytes, v_row_bytes × cell_count }                (v_trans = 0)
//! n_layer × { i32 v_type, u32 v_elem_bytes, u32 n_embd_v, v_elem_bytes × n_embd_v × cell_count }
//! ```
//!
//! Whether the numbers match the loaded model (layer count, row sizes, types) llama.cpp checks
//! itself and reports as an error; what it cannot survive is a layout that lies about sizes.

use crate::error::ShardError;

/// `LLAMA_STATE_SEQ_MAGIC` ('ggsq').
pub const MAGIC: u32 = 0x6767_7371;
/// `LLAMA_STATE_SEQ_VERSION` of the vendored llama.cpp.
pub const VERSION: u32 = 4;
/// More layers than any model has: a forged count is refused before it sizes a loop.
const MAX_LAYERS: u32 = 4_096;
/// ggml's type ids are small; anything past this is not a tensor type.
const MAX_GGML_TYPE: i32 = 128;

/// Returns the tokens `state` carries once its whole layout checks out: at most `max_tokens`
/// tokens and cells, `cell_ext_bytes` of extension per cell (0 unless the model uses M-RoPE).
pub fn check(state: &[u8], max_tokens: usize, cell_ext_bytes: usize) -> Result<Vec<u32>, ShardError> {
    let mut reader = Reader { bytes: state, at: 0 };
    if reader.u32()? != MAGIC {
        return Err(bad("not a sequence state (wrong magic)"));
    }
    let version = reader.u32()?;
    if version != VERSION {
        return Err(bad(format!("sequence state version {version}; this shard reads {VERSION}")));
    }
    let n_tokens = reader.u32()? as usize;
    if n_tokens > max_tokens {
        return Err(bad(format!("{n_tokens} tokens; this shard holds at most {max_tokens}")));
    }
    reader.need(n_tokens as u64 * 4)?;
    let mut tokens = Vec::with_capacity(n_tokens);
    for _ in 0..n_tokens {
        let token = reader.i32()?;
        tokens.push(u32::try_from(token).map_err(|_| bad("a negative token id"))?);
    }
    if reader.u32()? != 1 {
        return Err(bad("a state of more than one KV stream"));
    }
    let cells = reader.u32()?;
    if cells as usize != n_tokens {
        return Err(bad(format!("{cells} cells for {n_tokens} tokens")));
    }
    if cells == 0 {
        return reader.end().map(|()| tokens);
    }
    let cells = u64::from(cells);
    reader.need(cells * (12 + cell_ext_bytes as u64))?;
    for position in 0..cells {
        let pos = reader.i32()?;
        if i64::from(pos) != position as i64 {
            return Err(bad("cells are not positions 0..n"));
        }
        if reader.u32()? != 1 {
            return Err(bad("a cell of more than one sequence"));
        }
        reader.skip(cell_ext_bytes as u64)?;
        reader.i32()?;
    }
    let v_trans = match reader.u32()? {
        0 => false,
        1 => true,
        _ => return Err(bad("v_trans is not a flag")),
    };
    let layers = reader.u32()?;
    if layers == 0 || layers > MAX_LAYERS {
        return Err(bad(format!("{layers} layers")));
    }
    reader.u32()?; // n_rot_k
    reader.u32()?; // n_rot_v
    for _ in 0..layers {
        reader.tensor_type()?;
        let row = reader.u64()?;
        reader.skip(row.checked_mul(cells).ok_or_else(|| bad("a key row size overflows"))?)?;
    }
    // Every layer of the models this engine runs has a V tensor, so `layers` V blocks follow
    // (a model without them, e.g. one with MLA attention, is refused: its sessions migrate
    // as a cache miss instead). A count that can stop early would accept a truncated state.
    for _ in 0..layers {
        reader.tensor_type()?;
        let bytes = if v_trans {
            let element = u64::from(reader.u32()?);
            let embedding = u64::from(reader.u32()?);
            element.checked_mul(embedding).and_then(|row| row.checked_mul(cells))
        } else {
            reader.u64()?.checked_mul(cells)
        };
        reader.skip(bytes.ok_or_else(|| bad("a value block size overflows"))?)?;
    }
    reader.end()?;
    Ok(tokens)
}

fn bad(reason: impl Into<String>) -> ShardError {
    ShardError::IncompatibleState(format!("malformed sequence state: {}", reason.into()))
}

/// A bounds-checked little-endian cursor.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.at) as u64
    }

    fn need(&self, bytes: u64) -> Result<(), ShardError> {
        if bytes > self.remaining() {
            return Err(bad(format!("truncated: {bytes} more bytes needed, {} left", self.remaining())));
        }
        Ok(())
    }

    fn skip(&mut self, bytes: u64) -> Result<(), ShardError> {
        self.need(bytes)?;
        self.at += bytes as usize;
        Ok(())
    }

    fn take<const N: usize>(&mut self) -> Result<[u8; N], ShardError> {
        self.need(N as u64)?;
        let mut out = [0; N];
        out.copy_from_slice(&self.bytes[self.at..self.at + N]);
        self.at += N;
        Ok(out)
    }

    fn u32(&mut self) -> Result<u32, ShardError> {
        self.take().map(u32::from_le_bytes)
    }

    fn i32(&mut self) -> Result<i32, ShardError> {
        self.take().map(i32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, ShardError> {
        self.take().map(u64::from_le_bytes)
    }

    fn tensor_type(&mut self) -> Result<(), ShardError> {
        let kind = self.i32()?;
        if !(0..MAX_GGML_TYPE).contains(&kind) {
            return Err(bad(format!("tensor type {kind}")));
        }
        Ok(())
    }

    fn end(&self) -> Result<(), ShardError> {
        if self.at != self.bytes.len() {
            return Err(bad(format!("{} bytes after the state", self.remaining())));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{MAGIC, VERSION, check};
    use crate::error::ShardError;

    /// A state as llama.cpp writes it: `tokens`, one cell each, `layers` K and V blocks of
    /// `row` bytes per cell.
    fn state(tokens: &[u32], layers: u32, row: u64, v_trans: bool) -> Vec<u8> {
        let mut out = Vec::new();
        let mut put = |bytes: &[u8]| out.extend_from_slice(bytes);
        put(&MAGIC.to_le_bytes());
        put(&VERSION.to_le_bytes());
        put(&(tokens.len() as u32).to_le_bytes());
        for token in tokens {
            put(&(*token as i32).to_le_bytes());
        }
        put(&1u32.to_le_bytes());
        put(&(tokens.len() as u32).to_le_bytes());
        if tokens.is_empty() {
            return out;
        }
        for position in 0..tokens.len() as i32 {
            put(&position.to_le_bytes());
            put(&1u32.to_le_bytes());
            put(&3i32.to_le_bytes());
        }
        put(&u32::from(v_trans).to_le_bytes());
        put(&layers.to_le_bytes());
        put(&64u32.to_le_bytes());
        put(&64u32.to_le_bytes());
        let data = vec![0xab; (row * tokens.len() as u64) as usize];
        for _ in 0..layers {
            put(&1i32.to_le_bytes());
            put(&row.to_le_bytes());
            put(&data);
        }
        for _ in 0..layers {
            put(&1i32.to_le_bytes());
            if v_trans {
                put(&2u32.to_le_bytes());
                put(&((row / 2) as u32).to_le_bytes());
            } else {
                put(&row.to_le_bytes());
            }
            put(&data);
        }
        out
    }

    fn refused(bytes: &[u8]) -> bool {
        matches!(check(bytes, 1_000, 0), Err(ShardError::IncompatibleState(_)))
    }

    #[test]
    fn a_well_formed_state_gives_its_tokens() {
        for v_trans in [false, true] {
            assert_eq!(check(&state(&[5, 6, 7], 3, 16, v_trans), 1_000, 0).unwrap(), vec![5, 6, 7]);
        }
        assert_eq!(check(&state(&[], 3, 16, false), 1_000, 0).unwrap(), Vec::<u32>::new());
    }

    #[test]
    fn every_truncation_of_a_state_is_refused() {
        let whole = state(&[5, 6, 7], 2, 8, false);
        for length in 0..whole.len() {
            assert!(refused(&whole[..length]), "a state cut at {length} of {} bytes", whole.len());
        }
        let mut longer = whole.clone();
        longer.push(0);
        assert!(refused(&longer), "trailing bytes");
    }

    #[test]
    fn garbage_and_forged_sizes_are_refused() {
        let mut seed = 0x1234_5678_u64;
        for length in [0, 1, 7, 64, 4096] {
            let garbage: Vec<u8> = (0..length)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    (seed >> 56) as u8
                })
                .collect();
            assert!(refused(&garbage), "{length} random bytes");
        }
        let whole = state(&[5, 6, 7], 2, 8, false);
        let forge = |offset: usize, bytes: &[u8]| {
            let mut forged = whole.clone();
            forged[offset..offset + bytes.len()].copy_from_slice(bytes);
            forged
        };
        // A token count far past the window, then past the bytes.
        assert!(refused(&forge(8, &u32::MAX.to_le_bytes())));
        assert!(refused(&forge(8, &4u32.to_le_bytes())));
        // Cells that are not the tokens' positions, or of two sequences.
        let cells = 12 + 3 * 4 + 8;
        assert!(refused(&forge(cells, &9i32.to_le_bytes())));
        assert!(refused(&forge(cells + 4, &2u32.to_le_bytes())));
        // A key row size that overflows or runs past the end.
        let first_row = cells + 3 * 12 + 16 + 4;
        assert!(refused(&forge(first_row, &u64::MAX.to_le_bytes())));
        assert!(refused(&forge(first_row, &9u64.to_le_bytes())));
        // A state bigger than the importer's window.
        assert!(matches!(check(&whole, 2, 0), Err(ShardError::IncompatibleState(_))));
    }
}
