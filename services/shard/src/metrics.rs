//! The shard's metrics, described once at startup. Labels have bounded cardinality.

pub const GENERATE_TOTAL: &str = "tether_shard_generate_total";
pub const CACHE_HITS: &str = "tether_shard_cache_hits_total";
pub const CACHE_MISSES: &str = "tether_shard_cache_misses_total";
pub const CACHE_EVICTIONS: &str = "tether_shard_cache_evictions_total";
pub const SHARED_PREFIX_HITS: &str = "tether_shard_shared_prefix_hits_total";
pub const SHARED_BLOCK_EVICTIONS: &str = "tether_shard_shared_block_evictions_total";
pub const PREFILL_TOKENS: &str = "tether_shard_prefill_tokens_total";
pub const CACHED_TOKENS: &str = "tether_shard_cached_tokens_total";
pub const DECODE_TOKENS: &str = "tether_shard_decode_tokens_total";
pub const QUEUE_SECONDS: &str = "tether_shard_queue_seconds";
pub const TTFT_SECONDS: &str = "tether_shard_ttft_seconds";
pub const SLOTS_BUSY: &str = "tether_shard_slots_busy";
pub const SESSIONS_HANDED_OFF: &str = "tether_shard_sessions_handed_off_total";
pub const SESSIONS_IMPORTED: &str = "tether_shard_sessions_imported_total";

pub fn describe() {
    metrics::describe_counter!(GENERATE_TOTAL, "Generate calls by outcome");
    metrics::describe_counter!(CACHE_HITS, "Turns whose claimed prefix the KV cache held");
    metrics::describe_counter!(CACHE_MISSES, "Turns answered with a cache miss");
    metrics::describe_counter!(CACHE_EVICTIONS, "Sessions evicted from the KV cache");
    metrics::describe_counter!(
        SHARED_PREFIX_HITS,
        "Stateless turns that matched a longer prefix in the content index than their session held"
    );
    metrics::describe_counter!(SHARED_BLOCK_EVICTIONS, "Token blocks evicted from the content index");
    metrics::describe_counter!(PREFILL_TOKENS, "Prompt tokens prefilled (not cached)");
    metrics::describe_counter!(CACHED_TOKENS, "Prompt tokens served from the KV cache");
    metrics::describe_counter!(DECODE_TOKENS, "Tokens generated");
    metrics::describe_histogram!(QUEUE_SECONDS, metrics::Unit::Seconds, "Wait for a decode slot");
    metrics::describe_histogram!(TTFT_SECONDS, metrics::Unit::Seconds, "Engine time to first token");
    metrics::describe_gauge!(SLOTS_BUSY, "Decode slots in use");
    metrics::describe_counter!(SESSIONS_HANDED_OFF, "Sessions a draining shard moved to their next owner");
    metrics::describe_counter!(SESSIONS_IMPORTED, "Sessions imported from another shard");
}
