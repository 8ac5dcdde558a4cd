//! The shard's per-session KV cache bookkeeping: for each session the token sequence whose
//! keys and values the engine holds, and its running prefix hash. Bounded by a total token
//! budget; the least recently used sessions are evicted first.
//!
//! For an engine whose cached prefixes any session can use (the sim), the held tokens are
//! also indexed by content ([`PrefixIndex`], within the same budget), so a stateless prompt
//! matches what another session left here. The session claim path (`lookup_prefix`) stays
//! per session: a chained turn names its own prefix.

use std::sync::atomic::{AtomicU64, Ordering};

use lru::LruCache;
use parking_lot::Mutex;
use tether_common::tokens::PrefixHash;

use crate::prefix_index::PrefixIndex;

struct Entry {
    tokens: Vec<u32>,
    hash: PrefixHash,
    /// Whose content this is in the shared index (`None`: imported, not indexed).
    scope: Option<u64>,
    /// The index's names of the full blocks of `tokens` (under `scope`), so extending the
    /// session or matching past its prefix hashes only the tokens after them.
    chain: Vec<u64>,
}

impl Entry {
    /// The chain's names of the first `tokens` tokens' full blocks, under `scope`.
    fn known(&self, scope: u64, tokens: usize, block: usize) -> &[u64] {
        match self.scope {
            Some(own) if own == scope => &self.chain[..self.chain.len().min(tokens / block)],
            _ => &[],
        }
    }
}

/// What a turn starts from.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    /// The claimed prefix is held: prefill only the new tokens.
    Hit { cached: u32, prompt_hash: PrefixHash },
    /// The claimed prefix is not held (evicted, never seen, or diverged).
    Miss { held: u32 },
}

pub struct KvCache {
    entries: Mutex<LruCache<u64, Entry>>,
    budget: u64,
    held: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    /// Held tokens by content, shared across sessions; `None` for an engine that can use only
    /// a session's own prefix.
    shared: Option<Mutex<PrefixIndex>>,
}

#[derive(Debug, Clone, Copy)]
pub struct CacheStats {
    pub sessions: u32,
    pub tokens: u64,
    pub hits: u64,
    pub misses: u64,
    /// Tokens in the content index (full blocks).
    pub shared_tokens: u64,
}

impl KvCache {
    pub fn new(budget_tokens: u64) -> Self {
        KvCache {
            entries: Mutex::new(LruCache::unbounded()),
            budget: budget_tokens,
            held: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            shared: None,
        }
    }

    /// Also indexes held tokens by content in blocks of `block_tokens`, within the budget, so
    /// [`KvCache::longest_prefix`] matches prefixes any session left.
    pub fn with_shared_prefixes(mut self, block_tokens: u32) -> Self {
        self.shared = Some(Mutex::new(PrefixIndex::new(block_tokens, self.budget)));
        self
    }

    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Checks that `session` holds a prefix of `prefix_len` tokens hashing to `prefix_hash`,
    /// and returns the hash of the prompt once `new_tokens` follow it.
    pub fn lookup_prefix(&self, session: u64, prefix_len: u32, prefix_hash: u64, new_tokens: &[u32]) -> Lookup {
        let mut entries = self.entries.lock();
        let result = match entries.get(&session) {
            Some(entry) if entry.tokens.len() >= prefix_len as usize => {
                let hash = if entry.tokens.len() == prefix_len as usize {
                    entry.hash
                } else {
                    // A fork from an earlier point of the session: rehash that prefix.
                    PrefixHash::of(&entry.tokens[..prefix_len as usize])
                };
                if hash.value() == prefix_hash {
                    let mut prompt_hash = hash;
                    prompt_hash.extend(new_tokens);
                    Lookup::Hit { cached: prefix_len, prompt_hash }
                } else {
                    Lookup::Miss { held: entry.tokens.len() as u32 }
                }
            }
            Some(entry) => Lookup::Miss { held: entry.tokens.len() as u32 },
            None if prefix_len == 0 => {
                let mut prompt_hash = PrefixHash::default();
                prompt_hash.extend(new_tokens);
                Lookup::Hit { cached: 0, prompt_hash }
            }
            None => Lookup::Miss { held: 0 },
        };
        match result {
            Lookup::Hit { .. } => self.hits.fetch_add(1, Ordering::Relaxed),
            Lookup::Miss { .. } => self.misses.fetch_add(1, Ordering::Relaxed),
        };
        result
    }

    /// Returns how many leading tokens of `prompt` are held (the stateless path): the
    /// session's own prefix, or a longer one from the content index.
    /// Only blocks held for `scope` (the tenant's, see `GenerateRequest.cache_scope`) match.
    pub fn longest_prefix(&self, session: u64, scope: u64, prompt: &[u32]) -> u32 {
        let (own, shared) = {
            let mut entries = self.entries.lock();
            let entry = entries.get(&session);
            let own = entry.map_or(0, |entry| entry.tokens.iter().zip(prompt).take_while(|(a, b)| a == b).count());
            let shared = self.shared.as_ref().map_or(0, |index| {
                let mut index = index.lock();
                let block = index.block_tokens() as usize;
                // The blocks of the session's own matching prefix are named already.
                let known = entry.map_or(&[][..], |entry| entry.known(scope, own, block));
                index.longest_prefix_after(scope, known, &prompt[known.len() * block..])
            });
            (own as u32, shared)
        };
        if shared > own {
            metrics::counter!(crate::metrics::SHARED_PREFIX_HITS).increment(1);
        }
        let matched = own.max(shared);
        if matched > 0 {
            self.hits.fetch_add(1, Ordering::Relaxed);
        } else {
            self.misses.fetch_add(1, Ordering::Relaxed);
        }
        matched
    }

    /// After a claim of `prefix_len` tokens hit: how many leading tokens of the whole prompt
    /// (that prefix, then `new_tokens`) are held, counting blocks past the session's own that
    /// the content index holds (another session left them). Only the tokens after the
    /// session's named blocks are hashed. `prefix_len` when there is no index.
    pub fn extend_claim(&self, session: u64, scope: u64, prefix_len: u32, new_tokens: &[u32]) -> u32 {
        let Some(index) = &self.shared else { return prefix_len };
        let entries = self.entries.lock();
        let Some(entry) = entries.peek(&session).filter(|entry| entry.tokens.len() >= prefix_len as usize) else {
            return prefix_len;
        };
        let mut index = index.lock();
        let block = index.block_tokens() as usize;
        let known = entry.known(scope, prefix_len as usize, block);
        let mut rest = entry.tokens[known.len() * block..prefix_len as usize].to_vec();
        rest.extend_from_slice(new_tokens);
        let matched = index.longest_prefix_after(scope, known, &rest);
        if matched > prefix_len {
            metrics::counter!(crate::metrics::SHARED_PREFIX_HITS).increment(1);
        }
        matched.max(prefix_len)
    }

    /// Records that `session` now holds its `prefix_len` prefix followed by `appended`
    /// (the new prompt tokens and the generated ones). If the session changed meanwhile
    /// (a concurrent turn), the entry is dropped: the next turn resends, never misuses.
    pub fn extend(&self, session: u64, scope: u64, prefix_len: u32, prefix_hash: u64, appended: &[&[u32]]) {
        let mut entries = self.entries.lock();
        let Some(entry) = entries.get_mut(&session) else {
            if prefix_len == 0 {
                drop(entries);
                self.replace(session, scope, appended.concat());
            }
            return;
        };
        if entry.tokens.len() == prefix_len as usize && entry.hash.value() == prefix_hash {
            for part in appended {
                entry.tokens.extend_from_slice(part);
                entry.hash.extend(part);
                self.held.fetch_add(part.len() as u64, Ordering::Relaxed);
            }
            if entry.scope != Some(scope) {
                entry.chain.clear();
            }
            entry.scope = Some(scope);
            self.index(scope, &mut entry.chain, &entry.tokens);
            drop(entries);
            self.evict_over_budget();
        } else if let Some(entry) = entries.pop(&session) {
            self.held.fetch_sub(entry.tokens.len() as u64, Ordering::Relaxed);
        }
    }

    /// Replaces what `session` holds with `tokens` (after a full prefill), indexed for `scope`.
    pub fn replace(&self, session: u64, scope: u64, tokens: Vec<u32>) {
        let mut chain = Vec::new();
        self.index(scope, &mut chain, &tokens);
        self.hold(session, Some(scope), tokens, chain);
    }

    /// Adds `tokens` to the content index under `scope`, when there is one, going on from
    /// `chain` (the names of their first blocks, see [`PrefixIndex::insert_after`]).
    fn index(&self, scope: u64, chain: &mut Vec<u64>, tokens: &[u32]) {
        if let Some(index) = &self.shared {
            let evicted = index.lock().insert_after(scope, chain, tokens);
            if evicted > 0 {
                metrics::counter!(crate::metrics::SHARED_BLOCK_EVICTIONS).increment(evicted as u64);
            }
        }
    }

    fn hold(&self, session: u64, scope: Option<u64>, tokens: Vec<u32>, chain: Vec<u64>) {
        let entry = Entry { hash: PrefixHash::of(&tokens), tokens, scope, chain };
        let added = entry.tokens.len() as u64;
        {
            let mut entries = self.entries.lock();
            if let Some(old) = entries.put(session, entry) {
                self.held.fetch_sub(old.tokens.len() as u64, Ordering::Relaxed);
            }
            self.held.fetch_add(added, Ordering::Relaxed);
        }
        self.evict_over_budget();
    }

    /// Returns the held sessions, most recently used first (does not change the order).
    pub fn sessions(&self) -> Vec<u64> {
        self.entries.lock().iter().map(|(session, _)| *session).collect()
    }

    /// Returns the tokens `session` holds, to move it to another shard (counts as a use).
    pub fn export(&self, session: u64) -> Option<Vec<u32>> {
        self.entries.lock().get(&session).map(|entry| entry.tokens.clone())
    }

    /// Records that `session` holds `tokens`, imported from another shard: replaces what it
    /// held here, as the most recently used session, within the token budget.
    /// Imported tokens are not indexed for sharing: whose they are is not known here.
    pub fn import(&self, session: u64, tokens: Vec<u32>) {
        self.hold(session, None, tokens, Vec::new());
    }

    pub fn drop_session(&self, session: u64) -> bool {
        let removed = self.entries.lock().pop(&session);
        if let Some(entry) = &removed {
            self.held.fetch_sub(entry.tokens.len() as u64, Ordering::Relaxed);
        }
        removed.is_some()
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            sessions: self.entries.lock().len() as u32,
            tokens: self.held.load(Ordering::Relaxed),
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            shared_tokens: self.shared.as_ref().map_or(0, |index| index.lock().tokens()),
        }
    }

    fn evict_over_budget(&self) {
        let mut entries = self.entries.lock();
        while self.held.load(Ordering::Relaxed) > self.budget {
            match entries.pop_lru() {
                Some((_, entry)) => {
                    self.held.fetch_sub(entry.tokens.len() as u64, Ordering::Relaxed);
                    metrics::counter!(crate::metrics::CACHE_EVICTIONS).increment(1);
                }
                None => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tether_common::tokens::PrefixHash;

    use super::{KvCache, Lookup};

    #[test]
    fn follow_up_hits_and_a_wrong_hash_misses() {
        let cache = KvCache::new(1_000);
        let first: Vec<u32> = (0..10).collect();
        assert_eq!(cache.longest_prefix(1, 0, &first), 0);
        cache.replace(1, 0, first.clone());
        let hash = PrefixHash::of(&first).value();
        match cache.lookup_prefix(1, 10, hash, &[10, 11]) {
            Lookup::Hit { cached, prompt_hash } => {
                assert_eq!(cached, 10);
                assert_eq!(prompt_hash, PrefixHash::of(&(0..12).collect::<Vec<_>>()));
            }
            miss => panic!("expected a hit, got {miss:?}"),
        }
        assert_eq!(cache.lookup_prefix(1, 10, hash ^ 1, &[10]), Lookup::Miss { held: 10 });
        assert_eq!(cache.lookup_prefix(1, 11, hash, &[10]), Lookup::Miss { held: 10 });
        assert_eq!(cache.lookup_prefix(2, 3, hash, &[10]), Lookup::Miss { held: 0 });

        cache.extend(1, 0, 10, hash, &[&[10, 11], &[12]]);
        assert_eq!(cache.stats().tokens, 13);
        let all: Vec<u32> = (0..13).collect();
        assert_eq!(cache.longest_prefix(1, 0, &all), 13);
        // A fork from an earlier prefix still hits.
        let fork_hash = PrefixHash::of(&all[..5]).value();
        assert!(matches!(cache.lookup_prefix(1, 5, fork_hash, &[99]), Lookup::Hit { cached: 5, .. }));
    }

    #[test]
    fn an_exported_session_imports_elsewhere_and_its_next_turn_hits() {
        let source = KvCache::new(1_000);
        assert_eq!(source.export(1), None, "nothing held, nothing exported");
        let turn: Vec<u32> = (0..8).collect();
        source.replace(1, 0, turn.clone());
        source.extend(1, 0, 8, PrefixHash::of(&turn).value(), &[&[8, 9], &[10]]);
        let tokens = source.export(1).expect("held");
        assert_eq!(tokens, (0..11).collect::<Vec<_>>());

        let target = KvCache::new(1_000);
        let claim = PrefixHash::of(&tokens).value();
        assert_eq!(target.lookup_prefix(1, 11, claim, &[11]), Lookup::Miss { held: 0 });
        target.import(1, tokens.clone());
        assert_eq!(target.stats().tokens, 11);
        assert!(matches!(target.lookup_prefix(1, 11, claim, &[11]), Lookup::Hit { cached: 11, .. }));
        // An import replaces what the session held before.
        target.import(1, vec![7; 4]);
        assert_eq!(target.export(1), Some(vec![7; 4]));
        assert_eq!(target.stats().tokens, 4);
    }

    #[test]
    fn an_import_respects_the_budget_and_evicts_the_least_recently_used() {
        let cache = KvCache::new(100);
        cache.replace(1, 0, vec![1; 50]);
        cache.replace(2, 0, vec![2; 40]);
        assert!(cache.export(1).is_some()); // touch 1: 2 is now least recently used
        cache.import(3, vec![3; 30]);
        assert_eq!(cache.export(2), None, "session 2 was evicted for the import");
        assert_eq!(cache.export(3).map(|t| t.len()), Some(30));
        assert_eq!(cache.stats().tokens, 80);
        // An import larger than the whole budget is not held.
        cache.import(4, vec![4; 101]);
        assert!(cache.stats().tokens <= 100);
        assert_eq!(cache.export(4), None);
    }

    #[test]
    fn shared_prefixes_hit_across_sessions_and_follow_chained_turns() {
        let cache = KvCache::new(1_000).with_shared_prefixes(4);
        let first: Vec<u32> = (0..10).collect();
        cache.replace(1, 0, first.clone());
        // Another session resending the prompt gets its full blocks; its own prefix is none.
        assert_eq!(cache.longest_prefix(2, 0, &(0..12).collect::<Vec<_>>()), 8);
        // A chained turn of session 1 adds its tokens to the index too.
        cache.extend(1, 0, 10, PrefixHash::of(&first).value(), &[&[10, 11, 12], &[13, 14]]);
        assert_eq!(cache.longest_prefix(3, 0, &(0..20).collect::<Vec<_>>()), 12);
        assert_eq!(cache.stats().shared_tokens, 12);
        // Without the index, only the session itself hits.
        let plain = KvCache::new(1_000);
        plain.replace(1, 0, first.clone());
        assert_eq!(plain.longest_prefix(2, 0, &first), 0);
        assert_eq!(plain.longest_prefix(1, 0, &first), 10);
        assert_eq!(plain.stats().shared_tokens, 0);
    }

    #[test]
    fn a_claim_goes_on_into_blocks_another_session_left() {
        let cache = KvCache::new(1_000).with_shared_prefixes(4);
        let long: Vec<u32> = (0..30).collect();
        cache.replace(1, 0, long.clone());
        // Session 2 holds the first 10 tokens and claims them; the next ones are session 1's.
        cache.replace(2, 0, long[..10].to_vec());
        let claim = PrefixHash::of(&long[..10]).value();
        assert!(matches!(cache.lookup_prefix(2, 10, claim, &long[10..26]), Lookup::Hit { cached: 10, .. }));
        assert_eq!(cache.extend_claim(2, 0, 10, &long[10..26]), 24, "up to the last full block held");
        assert_eq!(cache.extend_claim(2, 0, 10, &[99; 16]), 10, "nothing past the claim");
        assert_eq!(cache.extend_claim(2, 7, 10, &long[10..26]), 10, "another tenant's scope");
        // Extending the session indexes only what follows its named blocks, as a whole insert would.
        cache.extend(2, 0, 10, claim, &[&long[10..26], &[5, 5]]);
        assert_eq!(cache.longest_prefix(3, 0, &long[..26]), 24);
        assert_eq!(cache.stats().shared_tokens, 28 + 4, "session 2's last block [24, 25, 5, 5] is its own");
        // Without the index, a claim is what it names.
        let plain = KvCache::new(1_000);
        plain.replace(2, 0, long[..10].to_vec());
        assert_eq!(plain.extend_claim(2, 0, 10, &long[10..26]), 10);
    }

    #[test]
    fn budget_evicts_least_recently_used_sessions() {
        let cache = KvCache::new(100);
        cache.replace(1, 0, vec![1; 60]);
        cache.replace(2, 0, vec![2; 30]);
        assert_eq!(cache.longest_prefix(1, 0, &[1]), 1); // touch 1
        cache.replace(3, 0, vec![3; 30]);
        assert_eq!(cache.longest_prefix(2, 0, &[2]), 0, "session 2 was least recently used");
        assert_eq!(cache.longest_prefix(1, 0, &[1]), 1);
        assert!(cache.stats().tokens <= 100);
        assert!(cache.drop_session(3));
        assert_eq!(cache.stats().tokens, 60);
    }
}
