//! Remembering the tokens of texts seen recently.
//!
//! A stateless client (`store: false`, the whole history every turn) sends the same items turn
//! after turn; each item's text is tokenized on its own (chat markup separates them, so BPE never
//! merges across items), so its tokens can be reused. Without this, re-tokenizing the history
//! was the largest share of the worker's CPU on `http-full` turns (loadtest/profiles).
//!
//! Keys are 128 bits of two keyed SipHashes plus the text's length, so a different text that
//! maps to the same tokens is not a practical concern; the memo is bounded by tokens held and
//! evicts the least recently used text.

use std::hash::{BuildHasher, Hasher};
use std::num::NonZeroUsize;
use std::sync::Arc;

use lru::LruCache;
use parking_lot::Mutex;

use super::Tokenizer;

/// Texts shorter than this are tokenized again: cheaper than a lookup. Short texts are most of
/// a tool loop's items (calls, their arguments, short outputs), so the bound is low: the
/// `memo` bench compares a lookup with BPE at a few sizes.
const MIN_BYTES: usize = 32;
/// Tokens held at most (4 bytes each).
const BUDGET_TOKENS: usize = 4 << 20;
/// Texts held at most.
const MAX_TEXTS: usize = 1 << 16;

pub struct Memoized {
    inner: Arc<dyn Tokenizer>,
    seeds: (std::hash::RandomState, std::hash::RandomState),
    memo: Mutex<Memo>,
}

struct Memo {
    texts: LruCache<(u64, u64, usize), Arc<[u32]>>,
    tokens: usize,
}

impl Memoized {
    pub fn new(inner: Arc<dyn Tokenizer>) -> Self {
        Memoized {
            inner,
            seeds: (std::hash::RandomState::new(), std::hash::RandomState::new()),
            memo: Mutex::new(Memo { texts: LruCache::new(NonZeroUsize::new(MAX_TEXTS).expect("non-zero")), tokens: 0 }),
        }
    }

    fn key(&self, text: &str) -> (u64, u64, usize) {
        let hash = |seed: &std::hash::RandomState| {
            let mut hasher = seed.build_hasher();
            hasher.write(text.as_bytes());
            hasher.finish()
        };
        (hash(&self.seeds.0), hash(&self.seeds.1), text.len())
    }
}

impl Tokenizer for Memoized {
    fn encode(&self, text: &str) -> Vec<u32> {
        if text.len() < MIN_BYTES {
            return self.inner.encode(text);
        }
        let key = self.key(text);
        if let Some(tokens) = self.memo.lock().texts.get(&key) {
            return tokens.to_vec();
        }
        let tokens = self.inner.encode(text);
        if tokens.len() <= BUDGET_TOKENS / 8 {
            let mut memo = self.memo.lock();
            memo.tokens += tokens.len();
            if let Some((_, evicted)) = memo.texts.push(key, Arc::from(tokens.as_slice())) {
                memo.tokens -= evicted.len();
            }
            while memo.tokens > BUDGET_TOKENS {
                let Some((_, evicted)) = memo.texts.pop_lru() else { break };
                memo.tokens -= evicted.len();
            }
        }
        tokens
    }

    fn encode_markup(&self, text: &str) -> Vec<u32> {
        self.inner.encode_markup(text)
    }

    fn default_system(&self) -> Option<&str> {
        self.inner.default_system()
    }

    fn key(&self) -> u64 {
        self.inner.key()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::{Memoized, Tokenizer};
    use crate::tokenizer::O200k;

    #[test]
    fn remembered_tokens_equal_fresh_ones() {
        let plain = O200k::new();
        let memo = Memoized::new(Arc::new(O200k::new()));
        let long = "The router keeps the session's tokens; ".repeat(20);
        let other = format!("{long}and one more word.");
        for text in ["short", long.as_str(), long.as_str(), other.as_str(), long.as_str()] {
            assert_eq!(memo.encode(text), plain.encode(text), "{text}");
        }
        assert_eq!(memo.memo.lock().texts.len(), 2, "two long texts remembered once each");
    }
}
