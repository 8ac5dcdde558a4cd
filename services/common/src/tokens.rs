//! Token-prefix hashing shared by workers and shards.
//!
//! A worker tells a shard which prefix it believes the shard holds by its length and its
//! FNV-1a 64 hash. The hash is incremental, so each side extends it with new tokens only.

/// FNV-1a, 64 bits, fed incrementally.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fnv64(u64);

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

impl Fnv64 {
    pub const fn new() -> Self {
        Fnv64(FNV_OFFSET)
    }

    pub fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 ^= u64::from(*byte);
            self.0 = self.0.wrapping_mul(FNV_PRIME);
        }
    }

    pub fn finish(&self) -> u64 {
        self.0
    }
}

impl Default for Fnv64 {
    fn default() -> Self {
        Self::new()
    }
}

/// The running hash of a token sequence.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefixHash(Fnv64);

impl PrefixHash {
    /// Returns the hash of `tokens` from scratch.
    pub fn of(tokens: &[u32]) -> Self {
        let mut hash = PrefixHash::default();
        hash.extend(tokens);
        hash
    }

    /// Resumes a hash from its [`Self::value`] (a prefix hash a peer sent).
    pub const fn from_value(value: u64) -> Self {
        PrefixHash(Fnv64(value))
    }

    /// Extends the hash with the tokens that follow.
    pub fn extend(&mut self, tokens: &[u32]) {
        for token in tokens {
            self.0.write(&token.to_le_bytes());
        }
    }

    pub fn value(&self) -> u64 {
        self.0.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::PrefixHash;

    #[test]
    fn incremental_hash_equals_hash_from_scratch() {
        let tokens: Vec<u32> = (0..1000).map(|i| i * 7919 % 200_000).collect();
        let mut running = PrefixHash::of(&tokens[..300]);
        running.extend(&tokens[300..]);
        assert_eq!(running, PrefixHash::of(&tokens));
        assert_ne!(PrefixHash::of(&tokens[..999]), PrefixHash::of(&tokens));
    }
}
