//! Which llama.cpp sequence holds which session, and exactly which tokens each sequence's KV
//! cells hold.
//!
//! Invariant: `slot.tokens[i]` is the token whose keys and values sit at position `i` of
//! `slot.seq`, for every `i`. Tokens the engine sampled but never fed back (the last token of a
//! turn cut by `max_output_tokens`) are kept in `pending`: the shard's bookkeeping counts them as
//! held, so the next turn decodes them first. Pure bookkeeping; the runner applies the KV
//! operations these decisions imply.

use std::collections::HashMap;

/// One session's sequence.
#[derive(Debug)]
pub struct Slot {
    pub seq: i32,
    /// Tokens at positions `0..len` of the sequence's KV cells.
    pub tokens: Vec<u32>,
    /// Sampled tokens after `tokens` that are not in the KV cells yet.
    pub pending: Vec<u32>,
    /// A job is running on the sequence.
    pub active: bool,
    last_used: u64,
}

/// Where a job starts: keep `keep` tokens of the sequence, then decode `decode`.
#[derive(Debug, PartialEq, Eq)]
pub struct Resume {
    pub keep: usize,
    pub decode: Vec<u32>,
}

impl Slot {
    /// Plans a job that claims the first `cached` tokens of the session are held and appends
    /// `new_tokens`. `None` when the sequence holds fewer tokens than claimed.
    pub fn resume(&self, cached: u32, new_tokens: &[u32], need_logits: bool) -> Option<Resume> {
        let cached = cached as usize;
        let held = self.tokens.len();
        let (mut keep, mut decode) = if cached <= held {
            (cached, new_tokens.to_vec())
        } else if cached <= held + self.pending.len() {
            let mut decode = self.pending[..cached - held].to_vec();
            decode.extend_from_slice(new_tokens);
            (held, decode)
        } else {
            return None;
        };
        if decode.is_empty() && need_logits && keep > 0 {
            // Generation needs the logits of the last prompt position: decode it again.
            keep -= 1;
            decode.push(self.tokens[keep]);
        }
        Some(Resume { keep, decode })
    }
}

/// The sessions' sequences, with least-recently-used order among idle ones.
#[derive(Debug)]
pub struct SequenceTable {
    slots: HashMap<u64, Slot>,
    free: Vec<i32>,
    clock: u64,
}

impl SequenceTable {
    /// A table over the sequence ids `0..sequences`.
    pub fn new(sequences: u32) -> Self {
        SequenceTable { slots: HashMap::new(), free: (0..sequences as i32).rev().collect(), clock: 0 }
    }

    pub fn get(&self, session: u64) -> Option<&Slot> {
        self.slots.get(&session)
    }

    pub fn get_mut(&mut self, session: u64) -> Option<&mut Slot> {
        self.slots.get_mut(&session)
    }

    /// Gives `session` a free sequence (empty); `None` if every sequence is taken.
    pub fn allocate(&mut self, session: u64) -> Option<&mut Slot> {
        debug_assert!(!self.slots.contains_key(&session), "session already has a sequence");
        let seq = self.free.pop()?;
        self.clock += 1;
        let slot = Slot { seq, tokens: Vec::new(), pending: Vec::new(), active: false, last_used: self.clock };
        Some(self.slots.entry(session).or_insert(slot))
    }

    /// Marks `session` as just used.
    pub fn touch(&mut self, session: u64) {
        self.clock += 1;
        if let Some(slot) = self.slots.get_mut(&session) {
            slot.last_used = self.clock;
        }
    }

    /// The least recently used idle session other than `except`.
    pub fn least_recently_used(&self, except: Option<u64>) -> Option<u64> {
        self.slots
            .iter()
            .filter(|(session, slot)| !slot.active && Some(**session) != except)
            .min_by_key(|(_, slot)| slot.last_used)
            .map(|(session, _)| *session)
    }

    /// Removes `session`, returning its sequence id to the free list.
    pub fn remove(&mut self, session: u64) -> Option<Slot> {
        let slot = self.slots.remove(&session)?;
        self.free.push(slot.seq);
        Some(slot)
    }

    pub fn has_free(&self) -> bool {
        !self.free.is_empty()
    }

    /// Tokens in KV cells across all sequences.
    pub fn held_tokens(&self) -> usize {
        self.slots.values().map(|slot| slot.tokens.len()).sum()
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::{Resume, SequenceTable};

    #[test]
    fn resume_keeps_the_claimed_prefix_and_decodes_pending_tokens_first() {
        let mut table = SequenceTable::new(2);
        let slot = table.allocate(7).expect("a free sequence");
        slot.tokens = vec![1, 2, 3, 4];
        slot.pending = vec![5];

        // The claim covers the pending token: decode it before the new ones.
        assert_eq!(slot.resume(5, &[6, 7], true), Some(Resume { keep: 4, decode: vec![5, 6, 7] }));
        // A shorter claim (a fork, or a turn that failed) truncates.
        assert_eq!(slot.resume(2, &[9], true), Some(Resume { keep: 2, decode: vec![9] }));
        // Nothing new: the last position is decoded again for its logits.
        assert_eq!(slot.resume(4, &[], true), Some(Resume { keep: 3, decode: vec![4] }));
        assert_eq!(slot.resume(4, &[], false), Some(Resume { keep: 4, decode: vec![] }));
        // More than the sequence holds: lost.
        assert_eq!(slot.resume(6, &[1], true), None);
    }

    #[test]
    fn least_recently_used_skips_active_sessions_and_frees_sequences() {
        let mut table = SequenceTable::new(2);
        table.allocate(1).expect("seq").tokens = vec![0; 10];
        table.allocate(2).expect("seq").tokens = vec![0; 5];
        assert!(table.allocate(3).is_none(), "two sequences only");
        table.touch(1);
        assert_eq!(table.least_recently_used(None), Some(2));
        table.get_mut(2).expect("slot").active = true;
        assert_eq!(table.least_recently_used(None), Some(1));
        assert_eq!(table.least_recently_used(Some(1)), None);
        assert_eq!(table.held_tokens(), 15);
        let removed = table.remove(1).expect("slot 1");
        assert!(table.has_free());
        assert_eq!(table.allocate(3).expect("the freed sequence").seq, removed.seq);
    }
}
