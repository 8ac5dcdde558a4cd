//! Session keys and self-routing response ids.
//!
//! A response id is `resp_` + 16 hex digits of the session key + 32 hex digits (128 bits) of
//! randomness. Any edge recovers the session key from a `previous_response_id` and routes it
//! without a lookup table (lineage routing).

use std::fmt;

use rand::Rng;

/// A 64-bit key naming where a conversation lives on the ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionKey(pub u64);

impl SessionKey {
    /// Draws a random key.
    pub fn random() -> Self {
        SessionKey(rand::rng().random())
    }

    /// Derives a key from a client-chosen string (a session header or `prompt_cache_key`),
    /// scoped to the tenant so two tenants never share a key by choosing the same string.
    pub fn derive(tenant: &str, client_key: &str, salt: u32) -> Self {
        let mut hash = crate::tokens::Fnv64::new();
        hash.write(tenant.as_bytes());
        hash.write(&[0xff]);
        hash.write(client_key.as_bytes());
        hash.write(&salt.to_le_bytes());
        SessionKey(hash.finish())
    }

    /// Derives a key from the hash of a request's leading content (a keyless request placed
    /// by its prefix), scoped to the tenant. The separator byte differs from
    /// [`SessionKey::derive`]'s (neither occurs in UTF-8), so the two never meet.
    pub fn of_content(tenant: &str, content: u64) -> Self {
        let mut hash = crate::tokens::Fnv64::new();
        hash.write(tenant.as_bytes());
        hash.write(&[0xfe]);
        hash.write(&content.to_le_bytes());
        SessionKey(hash.finish())
    }
}

impl fmt::Display for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// The scope of a tenant's content in shared caches (a shard's prefix index): a hash of the
/// tenant, so content is only ever matched against the same tenant's.
pub fn cache_scope(tenant: &str) -> u64 {
    let mut hash = crate::tokens::Fnv64::new();
    hash.write(b"cache-scope\xff");
    hash.write(tenant.as_bytes());
    hash.finish()
}

/// A response id that carries its session key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ResponseId(String);

const RESPONSE_PREFIX: &str = "resp_";
const RESPONSE_LEN: usize = RESPONSE_PREFIX.len() + 16 + 32;

impl ResponseId {
    /// Mints a fresh id under `key`.
    pub fn new(key: SessionKey) -> Self {
        let random: u128 = rand::rng().random();
        ResponseId(format!("{RESPONSE_PREFIX}{:016x}{random:032x}", key.0))
    }

    /// Parses an id minted by [`ResponseId::new`]; anything else is `None`.
    pub fn parse(text: &str) -> Option<Self> {
        if text.len() != RESPONSE_LEN || !text.starts_with(RESPONSE_PREFIX) {
            return None;
        }
        let hex = &text[RESPONSE_PREFIX.len()..];
        if !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return None;
        }
        Some(ResponseId(text.to_owned()))
    }

    /// Returns the session key the id was minted under.
    pub fn session_key(&self) -> SessionKey {
        let hex = &self.0[RESPONSE_PREFIX.len()..RESPONSE_PREFIX.len() + 16];
        SessionKey(u64::from_str_radix(hex, 16).expect("validated at parse"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ResponseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Mints an opaque id with a prefix (`msg`, `fc`, `call`): 96 random bits in hex.
pub fn item_id(prefix: &str) -> String {
    let random: u128 = rand::rng().random::<u128>() >> 32;
    format!("{prefix}_{random:024x}")
}

/// The id (`msg`, `fc`, `call` prefix) of the output item at `output_index` of `response_id`:
/// 96 bits derived from the response's id (itself 128 random bits), so a worker continuing a
/// response another one started names its items exactly as the first did.
pub fn derived_item_id(prefix: &str, response_id: &str, output_index: u32) -> String {
    let hash = |seed: u8| {
        let mut hash = crate::tokens::Fnv64::new();
        hash.write(&[seed]);
        hash.write(response_id.as_bytes());
        hash.write(prefix.as_bytes());
        hash.write(&output_index.to_le_bytes());
        mix(hash.finish())
    };
    let bits = (u128::from(hash(1)) << 64 | u128::from(hash(2))) >> 32;
    format!("{prefix}_{bits:024x}")
}

/// splitmix64's finalizer: spreads FNV's weak low bits over the word.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::{ResponseId, SessionKey, derived_item_id};

    #[test]
    fn derived_item_ids_are_stable_and_distinct() {
        let one = ResponseId::new(SessionKey(1));
        let two = ResponseId::new(SessionKey(1));
        assert_eq!(derived_item_id("msg", one.as_str(), 0), derived_item_id("msg", one.as_str(), 0));
        let ids: std::collections::HashSet<String> =
            [("msg", &one, 0), ("msg", &one, 1), ("fc", &one, 1), ("call", &one, 1), ("msg", &two, 0)]
                .iter()
                .map(|(prefix, id, index)| derived_item_id(prefix, id.as_str(), *index))
                .collect();
        assert_eq!(ids.len(), 5);
        let id = derived_item_id("fc", one.as_str(), 3);
        assert!(id.starts_with("fc_") && id.len() == 3 + 24, "{id}");
    }

    #[test]
    fn response_id_carries_its_session_key() {
        let key = SessionKey(0x0123_4567_89ab_cdef);
        let id = ResponseId::new(key);
        let parsed = ResponseId::parse(id.as_str()).expect("own ids parse");
        assert_eq!(parsed.session_key(), key);
        assert_ne!(ResponseId::new(key), id, "ids are random after the key");
    }

    #[test]
    fn foreign_ids_do_not_parse() {
        for bad in ["", "resp_", "resp_xyz", "msg_0123456789abcdef0123456789abcdef0123456789abcdef"] {
            assert!(ResponseId::parse(bad).is_none(), "{bad}");
        }
        let upper = format!("resp_{}", "A".repeat(48));
        assert!(ResponseId::parse(&upper).is_none());
    }

    #[test]
    fn derived_keys_are_tenant_scoped() {
        assert_eq!(SessionKey::derive("t", "abc", 0), SessionKey::derive("t", "abc", 0));
        assert_ne!(SessionKey::derive("t", "abc", 0), SessionKey::derive("u", "abc", 0));
        assert_ne!(SessionKey::derive("t", "abc", 0), SessionKey::derive("t", "abc", 1));
    }
}
