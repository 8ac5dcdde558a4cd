//! The worker's session cache: response states by (tenant, response id), bounded by bytes
//! and entries (least recently used first) and by a time to live.
//!
//! An evicted parent is simply absent: continuing from it yields an explicit
//! `previous_response_not_found`, never silently wrong state. Another tenant's id misses
//! exactly like an unknown one.

use std::sync::Arc;
use std::time::Duration;

use lru::LruCache;
use parking_lot::Mutex;

use super::state::ResponseState;

#[derive(Clone, Copy, Debug)]
pub struct CacheLimits {
    pub max_bytes: usize,
    pub max_entries: usize,
    pub ttl: Duration,
}

struct Inner {
    /// Keyed by a hash of (tenant, id) so a lookup allocates nothing; a hit is checked
    /// against the state's own tenant and id, so a collision is a miss, never a wrong state.
    entries: LruCache<u64, Arc<ResponseState>>,
    bytes: usize,
}

fn key(tenant: &str, id: &str) -> u64 {
    let mut hash = tether_common::tokens::Fnv64::new();
    hash.write(tenant.as_bytes());
    hash.write(&[0xff]);
    hash.write(id.as_bytes());
    hash.finish()
}

pub struct SessionCache {
    inner: Mutex<Inner>,
    limits: CacheLimits,
}

impl SessionCache {
    pub fn new(limits: CacheLimits) -> Self {
        SessionCache { inner: Mutex::new(Inner { entries: LruCache::unbounded(), bytes: 0 }), limits }
    }

    /// Returns the state of `id` if `tenant` owns it and it has not expired.
    pub fn get(&self, tenant: &str, id: &str) -> Option<Arc<ResponseState>> {
        let mut inner = self.inner.lock();
        let key = key(tenant, id);
        let state = inner.entries.get(&key)?.clone();
        if *state.tenant != *tenant || state.id != id {
            return None;
        }
        if state.created.elapsed() > self.limits.ttl {
            inner.entries.pop(&key);
            inner.bytes -= state.own_bytes();
            metrics::counter!(crate::metrics::CACHE_EVICTIONS, "reason" => "ttl").increment(1);
            return None;
        }
        Some(state)
    }

    pub fn insert(&self, state: Arc<ResponseState>) {
        let bytes = state.own_bytes();
        let mut inner = self.inner.lock();
        if let Some(old) = inner.entries.put(key(&state.tenant, &state.id), state) {
            inner.bytes -= old.own_bytes();
        }
        inner.bytes += bytes;
        while inner.bytes > self.limits.max_bytes || inner.entries.len() > self.limits.max_entries {
            let Some((_, evicted)) = inner.entries.pop_lru() else { break };
            inner.bytes -= evicted.own_bytes();
            metrics::counter!(crate::metrics::CACHE_EVICTIONS, "reason" => "capacity").increment(1);
        }
        metrics::gauge!(crate::metrics::CACHE_BYTES).set(inner.bytes as f64);
        metrics::gauge!(crate::metrics::CACHE_ENTRIES).set(inner.entries.len() as f64);
    }

    pub fn remove(&self, tenant: &str, id: &str) -> Option<Arc<ResponseState>> {
        let mut inner = self.inner.lock();
        let key = key(tenant, id);
        if inner.entries.peek(&key).is_none_or(|state| *state.tenant != *tenant || state.id != id) {
            return None;
        }
        let removed = inner.entries.pop(&key)?;
        inner.bytes -= removed.own_bytes();
        Some(removed)
    }

    /// Drops every `store=false` state scoped to a closed connection.
    pub fn release_connection(&self, connection: u64) -> u32 {
        let mut inner = self.inner.lock();
        let doomed: Vec<_> = inner
            .entries
            .iter()
            .filter(|(_, state)| !state.store && state.connection == connection)
            .map(|(key, _)| *key)
            .collect();
        for key in &doomed {
            if let Some(state) = inner.entries.pop(key) {
                inner.bytes -= state.own_bytes();
            }
        }
        doomed.len() as u32
    }

    /// Every `store=true` state held (for a hand-off).
    pub fn stored_states(&self) -> Vec<Arc<ResponseState>> {
        self.inner.lock().entries.iter().filter(|(_, state)| state.store).map(|(_, state)| state.clone()).collect()
    }

    pub fn len(&self) -> usize {
        self.inner.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn bytes(&self) -> usize {
        self.inner.lock().bytes
    }
}
