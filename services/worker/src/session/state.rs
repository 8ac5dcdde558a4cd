//! The state of one completed response: its chain's items, the rendered token ids the shard
//! holds, the prefix hash, the safety verdicts, and the Response object for retrieval.
//!
//! Items and tokens are kept as segments shared with the parent (`Arc<[T]>` per turn), so a
//! turn copies a few pointers, never the whole history.

use std::sync::Arc;
use std::time::Instant;

use tether_common::SessionKey;
use tether_common::tokens::PrefixHash;

use crate::api::items::Item;

/// An append-only sequence stored as shared segments.
#[derive(Clone, Debug)]
pub struct Segments<T> {
    parts: Vec<Arc<[T]>>,
    len: usize,
}

impl<T> Default for Segments<T> {
    fn default() -> Self {
        Segments { parts: Vec::new(), len: 0 }
    }
}

impl<T: Clone> Segments<T> {
    /// Returns this sequence with `tail` appended; the existing segments are shared.
    pub fn with(&self, tail: Vec<T>) -> Self {
        let mut parts = self.parts.clone();
        let len = self.len + tail.len();
        if !tail.is_empty() {
            parts.push(tail.into());
        }
        Segments { parts, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.parts.iter().flat_map(|part| part.iter())
    }

    pub fn to_vec(&self) -> Vec<T> {
        let mut out = Vec::with_capacity(self.len);
        for part in &self.parts {
            out.extend_from_slice(part);
        }
        out
    }

    /// The last segment (this turn's own part).
    pub fn last(&self) -> Option<&[T]> {
        self.parts.last().map(|part| &part[..])
    }

    /// Copies the last `n` elements.
    pub fn tail(&self, n: usize) -> Vec<T> {
        self.iter().skip(self.len.saturating_sub(n)).cloned().collect()
    }
}

/// One safety verdict over a segment of input items.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub classifier: Arc<str>,
    pub items: u32,
    pub bytes: u64,
}

#[derive(Debug)]
pub struct ResponseState {
    pub id: String,
    /// The response this one continues (`previous_response_id`).
    pub parent: Option<String>,
    pub tenant: Arc<str>,
    pub session: SessionKey,
    pub store: bool,
    /// The WebSocket connection a `store=false` response is scoped to (0 for HTTP).
    pub connection: u64,
    pub model: String,
    /// Hash of the rendered header (instructions and tools) at the top of `tokens`.
    pub header_key: u64,
    /// Every conversation item from the root through this response's output.
    pub items: Segments<Item>,
    /// The token ids the shard holds: the rendered prompt plus the generated tokens.
    pub tokens: Segments<u32>,
    /// Items and tokens this response added to its parent's (what a replica delta carries).
    pub own_items: u32,
    pub own_tokens: u32,
    /// The tokens were rendered from scratch here (the header changed or no parent).
    pub tokens_rebuilt: bool,
    pub prefix_hash: PrefixHash,
    /// Whether `tokens` ends inside an assistant block (after generated output).
    pub open_assistant: bool,
    pub tool_outputs_seen: u32,
    /// Safety verdicts of the input items checked so far, one per turn.
    pub verdicts: Segments<Verdict>,
    /// The final Response object, serialized.
    pub response_json: Arc<[u8]>,
    pub created: Instant,
}

impl ResponseState {
    /// Approximate bytes this state adds to the cache (its own segments and object).
    pub fn own_bytes(&self) -> usize {
        let items: usize = self.items.last().map_or(0, |items| items.iter().map(|i| i.heap_bytes() + 64).sum());
        let tokens = self.own_tokens as usize * 4;
        256 + self.id.len()
            + items
            + tokens
            + self.response_json.len()
            + (self.items.parts.len() + self.tokens.parts.len()) * 16
    }
}

#[cfg(test)]
mod tests {
    use super::Segments;

    #[test]
    fn segments_share_the_prefix() {
        let a = Segments::default().with(vec![1, 2]);
        let b = a.with(vec![3]);
        let c = a.with(vec![]);
        assert_eq!(b.to_vec(), vec![1, 2, 3]);
        assert_eq!(b.len(), 3);
        assert_eq!(c.len(), 2);
        assert_eq!(b.iter().copied().collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(a.to_vec(), vec![1, 2]);
    }
}
