//! The shard's content-addressed prefix index: which token blocks it holds, whatever session
//! produced them, so a stateless request whose prompt starts like one already seen here (the
//! same history resent, or another conversation with the same leading content) prefills only
//! what follows the shared prefix.
//!
//! As in vLLM's automatic prefix caching, a prompt is cut into fixed-size blocks from its
//! start, and each full block is named by a hash chained from its parent's
//! (`hash(parent, block tokens)`), so a block names its whole prefix, not only its own tokens.
//! A lookup walks the chain from the first block and stops at the first one not held. Each
//! block keeps its parent's name and its tokens, and a match checks both, so a hash collision
//! can end a match early but never make a different prefix match (by induction from the root).
//!
//! Bounded by a token budget (blocks × block size), least recently used blocks first. Every
//! use touches a chain's blocks from its last to its first, so a parent is always more
//! recently used than its children: eviction takes a chain's tail before its head and never
//! leaves a block whose parent is gone.

use std::hash::{DefaultHasher, Hash, Hasher};

use lru::LruCache;

struct Block {
    parent: u64,
    tokens: Box<[u32]>,
}

impl Block {
    fn is(&self, parent: u64, tokens: &[u32]) -> bool {
        self.parent == parent && *self.tokens == *tokens
    }
}

pub struct PrefixIndex {
    block_tokens: usize,
    /// The most blocks held (the token budget over the block size).
    capacity: usize,
    blocks: LruCache<u64, Block>,
}

impl PrefixIndex {
    /// Indexes blocks of `block_tokens` tokens, at most `budget_tokens` tokens in all.
    pub fn new(block_tokens: u32, budget_tokens: u64) -> Self {
        assert!(block_tokens > 0, "a block holds at least one token");
        let block_tokens = block_tokens as usize;
        let capacity = usize::try_from(budget_tokens).unwrap_or(usize::MAX) / block_tokens;
        PrefixIndex { block_tokens, capacity, blocks: LruCache::unbounded() }
    }

    pub fn block_tokens(&self) -> u32 {
        self.block_tokens as u32
    }

    /// Tokens held (full blocks only).
    pub fn tokens(&self) -> u64 {
        (self.blocks.len() * self.block_tokens) as u64
    }

    /// Returns how many leading tokens of `prompt` are held, a multiple of the block size,
    /// and marks their blocks used.
    /// Only blocks inserted under the same `scope` (the chain's root) match.
    pub fn longest_prefix(&mut self, scope: u64, prompt: &[u32]) -> u32 {
        self.longest_prefix_after(scope, &[], prompt)
    }

    /// [`Self::longest_prefix`] of a prompt whose first `known.len()` blocks are named by
    /// `known` (a held chain, as [`Self::insert_after`] left it): only `rest`, the tokens after
    /// them, is hashed and compared. Returns the tokens matched, `known`'s included.
    pub fn longest_prefix_after(&mut self, scope: u64, known: &[u64], rest: &[u32]) -> u32 {
        let mut parent = known.last().copied().unwrap_or(scope);
        let mut chain = Vec::new();
        for block in rest.chunks_exact(self.block_tokens) {
            let key = chain_hash(parent, block);
            if !self.blocks.peek(&key).is_some_and(|held| held.is(parent, block)) {
                break;
            }
            chain.push(key);
            parent = key;
        }
        // Marked used only when something past `known` matched: a known chain is its holder's,
        // touched by the insert that extends it.
        if !chain.is_empty() {
            self.touch(&chain);
            self.touch(known);
        }
        ((known.len() + chain.len()) * self.block_tokens) as u32
    }

    /// Records that `tokens` are held: every full block of them, chained from the start (a
    /// trailing partial block is not). Evicts the least recently used blocks beyond the
    /// budget and returns how many.
    pub fn insert(&mut self, scope: u64, tokens: &[u32]) -> usize {
        self.insert_after(scope, &mut Vec::new(), tokens)
    }

    /// [`Self::insert`], going on from `chain`: the names of the first blocks of `tokens`, as
    /// an earlier insert of a prefix of them left it. Only the blocks after it are hashed;
    /// `chain` ends naming every block held. A chain whose last block was evicted (and so,
    /// tail first, maybe more) is walked again from the start.
    pub fn insert_after(&mut self, scope: u64, chain: &mut Vec<u64>, tokens: &[u32]) -> usize {
        if chain.last().is_some_and(|last| !self.blocks.contains(last))
            || chain.len() * self.block_tokens > tokens.len()
        {
            chain.clear();
        }
        let mut parent = chain.last().copied().unwrap_or(scope);
        for block in tokens[chain.len() * self.block_tokens..].chunks_exact(self.block_tokens) {
            let key = chain_hash(parent, block);
            match self.blocks.peek(&key) {
                Some(held) if held.is(parent, block) => {}
                // Another block under the same name: hold nothing past it.
                Some(_) => break,
                None => {
                    self.blocks.put(key, Block { parent, tokens: block.into() });
                }
            }
            chain.push(key);
            parent = key;
        }
        self.touch(chain);
        let mut evicted = 0;
        while self.blocks.len() > self.capacity && self.blocks.pop_lru().is_some() {
            evicted += 1;
        }
        evicted
    }

    /// Marks `chain` used, last block first, so the first block ends most recently used.
    fn touch(&mut self, chain: &[u64]) {
        for key in chain.iter().rev() {
            self.blocks.promote(key);
        }
    }
}

/// The name of a block: its tokens chained to its parent's name. Any hash does (the index is
/// local to the process and every match is checked); SipHash with fixed keys is at hand.
fn chain_hash(parent: u64, block: &[u32]) -> u64 {
    let mut hasher = DefaultHasher::new();
    parent.hash(&mut hasher);
    block.hash(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::PrefixIndex;

    fn tokens(range: std::ops::Range<u32>) -> Vec<u32> {
        range.collect()
    }

    #[test]
    fn going_on_from_a_held_chain_equals_walking_from_the_start() {
        let mut index = PrefixIndex::new(4, 1_000);
        let mut chain = Vec::new();
        assert_eq!(index.insert_after(7, &mut chain, &tokens(0..10)), 0);
        assert_eq!(chain.len(), 2);
        index.insert_after(7, &mut chain, &tokens(0..26));
        assert_eq!(chain.len(), 6);
        let mut fresh = PrefixIndex::new(4, 1_000);
        let mut again = Vec::new();
        fresh.insert_after(7, &mut again, &tokens(0..26));
        assert_eq!(chain, again, "the same names as one insert of the whole");
        assert_eq!(index.tokens(), 24);
        // Another prompt with the same head: matched after the known chain, hashing the rest.
        let mut other = PrefixIndex::new(4, 1_000);
        other.insert(7, &tokens(0..40));
        assert_eq!(other.longest_prefix_after(7, &chain[..3], &tokens(12..40)), 40);
        assert_eq!(other.longest_prefix_after(7, &chain[..3], &tokens(12..30)), 28);
        assert_eq!(other.longest_prefix_after(8, &[], &tokens(0..40)), 0);
        // A chain whose tail was evicted is walked again from the start.
        let mut small = PrefixIndex::new(4, 8);
        let mut kept = Vec::new();
        small.insert_after(7, &mut kept, &tokens(0..8));
        small.insert(7, &tokens(100..108));
        assert_eq!(small.longest_prefix(7, &tokens(0..8)), 0, "evicted by the other chain");
        small.insert_after(7, &mut kept, &tokens(0..12));
        assert_eq!(small.longest_prefix(7, &tokens(0..12)), 8, "the head is back; the budget holds two blocks");
    }

    #[test]
    fn scopes_never_match_each_other() {
        let mut index = PrefixIndex::new(4, 1_000);
        let prompt = tokens(0..16);
        index.insert(7, &prompt);
        assert_eq!(index.longest_prefix(7, &prompt), 16);
        assert_eq!(index.longest_prefix(8, &prompt), 0, "another tenant's scope sees nothing");
    }

    #[test]
    fn a_prompt_hits_what_another_inserted_up_to_the_last_full_shared_block() {
        let mut index = PrefixIndex::new(4, 1_000);
        assert_eq!(index.longest_prefix(0, &tokens(0..20)), 0, "nothing held yet");
        // 10 tokens: two full blocks are held, the trailing two tokens are not.
        assert_eq!(index.insert(0, &tokens(0..10)), 0);
        assert_eq!(index.tokens(), 8);
        assert_eq!(index.longest_prefix(0, &tokens(0..20)), 8);
        assert_eq!(index.longest_prefix(0, &tokens(0..7)), 4, "only full blocks of the prompt match");
        assert_eq!(index.longest_prefix(0, &tokens(0..8)), 8, "a prompt ending on a block boundary");
        // Diverging inside the second block keeps only the first.
        let mut fork = tokens(0..12);
        fork[6] = 99;
        assert_eq!(index.longest_prefix(0, &fork), 4);
        // The same tokens at another position are another block: no match without the head.
        assert_eq!(index.longest_prefix(0, &tokens(4..12)), 0);
    }

    #[test]
    fn a_block_matches_only_under_its_own_prefix() {
        let mut index = PrefixIndex::new(2, 1_000);
        index.insert(0, &[1, 2, 3, 4]);
        index.insert(0, &[9, 9, 3, 4, 5, 6]);
        assert_eq!(index.longest_prefix(0, &[1, 2, 3, 4, 5, 6]), 4, "[5, 6] follows [9, 9, 3, 4], not [1, 2, 3, 4]");
        assert_eq!(index.longest_prefix(0, &[9, 9, 3, 4, 5, 6, 7]), 6);
        // A shared head block is held once: [1, 2] [3, 4] | [9, 9] [3, 4] [5, 6] | [7, 7].
        index.insert(0, &[1, 2, 7, 7]);
        assert_eq!(index.tokens(), 6 * 2);
    }

    #[test]
    fn the_budget_evicts_least_recently_used_chains_tail_first() {
        // Room for four blocks of 4 tokens.
        let mut index = PrefixIndex::new(4, 16);
        assert_eq!(index.insert(0, &tokens(0..8)), 0); // a: 2 blocks
        assert_eq!(index.insert(0, &tokens(100..108)), 0); // b: 2 blocks
        assert_eq!(index.longest_prefix(0, &tokens(0..8)), 8); // a is now the most recently used
        assert_eq!(index.insert(0, &tokens(200..204)), 1, "one block over the budget");
        assert_eq!(index.tokens(), 16);
        // b lost its tail block, not its head: its head still matches.
        assert_eq!(index.longest_prefix(0, &tokens(100..108)), 4);
        assert_eq!(index.longest_prefix(0, &tokens(0..8)), 8);
        assert_eq!(index.longest_prefix(0, &tokens(200..204)), 4);
    }

    #[test]
    fn a_chain_longer_than_the_budget_keeps_its_head() {
        let mut index = PrefixIndex::new(4, 12);
        assert_eq!(index.insert(0, &tokens(0..40)), 7);
        assert_eq!(index.tokens(), 12);
        assert_eq!(index.longest_prefix(0, &tokens(0..40)), 12);
        // A budget below one block holds nothing.
        let mut tiny = PrefixIndex::new(4, 3);
        assert_eq!(tiny.insert(0, &tokens(0..8)), 2);
        assert_eq!(tiny.longest_prefix(0, &tokens(0..8)), 0);
    }
}
