//! What the shard holds for each stateless session: the prompt and output of its last turn.
//!
//! A stateless client (no `previous_response_id`; `store: false` over HTTP) resends its whole
//! history every turn, and the worker renders it whole. The shard already holds the previous
//! turn's prompt and output under the session's key, so when the new prompt starts with them
//! the worker claims them as a prefix (as a chained turn claims its parent's tokens) and sends
//! only what follows: the `Generate` call carries the new items, not the history. A claim the
//! shard cannot honour (evicted, another shard) is a cache miss, and the worker resends the
//! whole prompt once, as for any claim.
//!
//! Keyed by the tenant's cache scope and the session key; bounded by the tokens it keeps,
//! least recently used first out.

use std::sync::Arc;

use lru::LruCache;
use parking_lot::Mutex;
use tether_common::tokens::PrefixHash;

/// A prefix of a new prompt that the shard holds for the session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Claim {
    pub len: u32,
    pub hash: PrefixHash,
}

struct Held {
    tokens: Arc<[u32]>,
    hash: PrefixHash,
}

struct Inner {
    entries: LruCache<(u64, u64), Held>,
    tokens: usize,
}

/// The last prompt and output of each stateless session, per (cache scope, session).
pub struct HeldPrompts {
    inner: Mutex<Inner>,
    max_tokens: usize,
}

impl HeldPrompts {
    /// Keeps at most `max_tokens` tokens in all (0 keeps nothing: every stateless turn is sent
    /// whole).
    pub fn new(max_tokens: usize) -> Self {
        HeldPrompts { inner: Mutex::new(Inner { entries: LruCache::unbounded(), tokens: 0 }), max_tokens }
    }

    /// The prefix of `prompt` the shard holds for the session: the whole of what its last
    /// turn left there when `prompt` starts with it. `None` when nothing is known, or the
    /// prompt diverges from it (an edited history, a different rendering of the last output):
    /// the turn is then sent whole.
    pub fn claim(&self, scope: u64, session: u64, prompt: &[u32]) -> Option<Claim> {
        let mut inner = self.inner.lock();
        let held = inner.entries.get(&(scope, session))?;
        // A claim must leave at least one token to send: the shard generates after new input.
        (held.tokens.len() < prompt.len() && prompt.starts_with(&held.tokens))
            .then(|| Claim { len: held.tokens.len() as u32, hash: held.hash })
    }

    /// Records what the shard holds for the session after a turn: its whole `prompt` followed
    /// by the `completion` it generated. `claim` is what the turn claimed (the hash goes on
    /// from it instead of starting over).
    pub fn remember(&self, scope: u64, session: u64, claim: Option<Claim>, prompt: &[u32], completion: &[u32]) {
        let len = prompt.len() + completion.len();
        if len > self.max_tokens {
            self.forget(scope, session);
            return;
        }
        let mut hash = match claim {
            Some(claim) => {
                let mut hash = claim.hash;
                hash.extend(&prompt[claim.len as usize..]);
                hash
            }
            None => PrefixHash::of(prompt),
        };
        hash.extend(completion);
        let mut tokens = Vec::with_capacity(len);
        tokens.extend_from_slice(prompt);
        tokens.extend_from_slice(completion);
        let mut inner = self.inner.lock();
        if let Some(old) = inner.entries.put((scope, session), Held { tokens: tokens.into(), hash }) {
            inner.tokens -= old.tokens.len();
        }
        inner.tokens += len;
        while inner.tokens > self.max_tokens {
            let Some((_, old)) = inner.entries.pop_lru() else { break };
            inner.tokens -= old.tokens.len();
        }
    }

    /// Drops what is known of the session (the shard's copy is no longer the one recorded).
    pub fn forget(&self, scope: u64, session: u64) {
        let mut inner = self.inner.lock();
        if let Some(old) = inner.entries.pop(&(scope, session)) {
            inner.tokens -= old.tokens.len();
        }
    }

    /// Tokens kept now.
    pub fn tokens(&self) -> usize {
        self.inner.lock().tokens
    }
}

impl std::fmt::Debug for HeldPrompts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeldPrompts").field("tokens", &self.tokens()).field("max_tokens", &self.max_tokens).finish()
    }
}

#[cfg(test)]
mod tests {
    use tether_common::tokens::PrefixHash;

    use super::{Claim, HeldPrompts};

    #[test]
    fn a_prompt_that_extends_the_last_turn_claims_it() {
        let held = HeldPrompts::new(1_000);
        assert_eq!(held.claim(1, 7, &[1, 2, 3]), None, "nothing known yet");
        held.remember(1, 7, None, &[1, 2, 3], &[4, 5]);
        let claim = held.claim(1, 7, &[1, 2, 3, 4, 5, 6, 7]).expect("extends the last turn");
        assert_eq!(claim, Claim { len: 5, hash: PrefixHash::of(&[1, 2, 3, 4, 5]) });
        // Another tenant's scope, another session, a diverging or equal prompt: no claim.
        assert_eq!(held.claim(2, 7, &[1, 2, 3, 4, 5, 6]), None);
        assert_eq!(held.claim(1, 8, &[1, 2, 3, 4, 5, 6]), None);
        assert_eq!(held.claim(1, 7, &[1, 2, 3, 4, 9, 6]), None);
        assert_eq!(held.claim(1, 7, &[1, 2, 3, 4, 5]), None, "nothing new to send");
        // The next turn's hash goes on from the claim: equal to the hash from scratch.
        held.remember(1, 7, Some(claim), &[1, 2, 3, 4, 5, 6, 7], &[8]);
        let next = held.claim(1, 7, &[1, 2, 3, 4, 5, 6, 7, 8, 9]).expect("claims again");
        assert_eq!(next, Claim { len: 8, hash: PrefixHash::of(&[1, 2, 3, 4, 5, 6, 7, 8]) });
        held.forget(1, 7);
        assert_eq!(held.claim(1, 7, &[1, 2, 3, 4, 5, 6, 7, 8, 9]), None);
        assert_eq!(held.tokens(), 0);
    }

    #[test]
    fn bounded_by_tokens_least_recent_out() {
        let held = HeldPrompts::new(10);
        held.remember(1, 1, None, &[1, 2, 3, 4], &[]);
        held.remember(1, 2, None, &[1, 2, 3, 4], &[]);
        assert!(held.claim(1, 1, &[1, 2, 3, 4, 5]).is_some(), "session 1 used last");
        held.remember(1, 3, None, &[1, 2, 3, 4], &[]);
        assert_eq!(held.tokens(), 8);
        assert!(held.claim(1, 2, &[1, 2, 3, 4, 5]).is_none(), "the least recently used went");
        assert!(held.claim(1, 1, &[1, 2, 3, 4, 5]).is_some());
        // Longer than the whole bound: not kept, and the older copy is dropped.
        held.remember(1, 1, None, &[0; 11], &[]);
        assert!(held.claim(1, 1, &[1, 2, 3, 4, 5]).is_none());
        assert_eq!(HeldPrompts::new(0).claim(1, 1, &[1]), None);
    }
}
