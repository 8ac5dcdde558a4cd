//! The worker's metrics, described once at startup. Labels have bounded cardinality.

pub const TURNS: &str = "tether_worker_turns_total";
pub const TURNS_RESUMED: &str = "tether_worker_turns_resumed_total";
pub const TURNS_DROPPED_AFTER_PAUSE: &str = "tether_worker_turns_dropped_after_pause_total";
pub const TURN_SECONDS: &str = "tether_worker_turn_seconds";
pub const PREPARE_SECONDS: &str = "tether_worker_prepare_seconds";
pub const RENDERED_TOKENS: &str = "tether_worker_rendered_tokens_total";
pub const PREFILL_BUDGET_REFUSED: &str = "tether_worker_prefill_budget_refused_total";
pub const TRUNCATED_ITEMS: &str = "tether_worker_truncated_items_total";
pub const SAFETY_CHECKED_BYTES: &str = "tether_worker_safety_checked_bytes_total";
pub const SAFETY_FLAGGED: &str = "tether_worker_safety_flagged_total";
pub const SHARD_RESENDS: &str = "tether_worker_shard_resends_total";
pub const SHARD_FAILOVERS: &str = "tether_worker_shard_failovers_total";
pub const STATELESS_CLAIMED_TOKENS: &str = "tether_worker_stateless_claimed_tokens_total";
pub const CACHE_EVICTIONS: &str = "tether_worker_cache_evictions_total";
pub const CACHE_BYTES: &str = "tether_worker_cache_bytes";
pub const CACHE_ENTRIES: &str = "tether_worker_cache_entries";
pub const REPLICATION_SECONDS: &str = "tether_worker_replication_seconds";
pub const REPLICATION_FAILURES: &str = "tether_worker_replication_failures_total";
pub const REPLICATION_FULL: &str = "tether_worker_replication_full_total";
pub const REPLICAS_STORED: &str = "tether_worker_replica_batches_total";
pub const PULLS: &str = "tether_worker_pulls_total";
pub const HANDED_OFF: &str = "tether_worker_handed_off_total";
pub const STATE_BYTES_SENT: &str = "tether_worker_state_bytes_sent_total";
pub const PULLED_BYTES: &str = "tether_worker_pulled_bytes_total";
/// `path` label values of [`STATE_BYTES_SENT`].
pub const PATH_REPLICATE: &str = "replicate";
pub const PATH_HAND_OFF: &str = "hand_off";
pub const FENCED: &str = "tether_worker_fenced_total";

pub fn describe() {
    metrics::describe_counter!(TURNS, "Turns by outcome");
    metrics::describe_counter!(
        TURNS_RESUMED,
        "Responses continued here after their first worker went away mid-response"
    );
    metrics::describe_counter!(
        TURNS_DROPPED_AFTER_PAUSE,
        "Turns not committed because this process was stopped while they ran (continued elsewhere)"
    );
    metrics::describe_histogram!(TURN_SECONDS, metrics::Unit::Seconds, "Turn duration on the worker");
    metrics::describe_histogram!(PREPARE_SECONDS, metrics::Unit::Seconds, "Resolve, validate, safety and render time");
    metrics::describe_counter!(RENDERED_TOKENS, "Tokens rendered, by path (incremental or full)");
    metrics::describe_counter!(PREFILL_BUDGET_REFUSED, "Turns refused because their tenant's prefill budget was spent");
    metrics::describe_counter!(
        TRUNCATED_ITEMS,
        "Items left out of a prompt to fit the context window (truncation: auto)"
    );
    metrics::describe_counter!(SAFETY_CHECKED_BYTES, "Bytes of input the safety classifier checked");
    metrics::describe_counter!(SAFETY_FLAGGED, "Inputs the safety classifier flagged");
    metrics::describe_counter!(SHARD_RESENDS, "Full-prompt resends after a shard cache miss");
    metrics::describe_counter!(SHARD_FAILOVERS, "Turns moved to another shard before output");
    metrics::describe_counter!(
        STATELESS_CLAIMED_TOKENS,
        "Tokens of stateless turns claimed from what the shard held of their session, not sent"
    );
    metrics::describe_counter!(CACHE_EVICTIONS, "Session states evicted, by reason");
    metrics::describe_gauge!(CACHE_BYTES, "Approximate bytes of session state held");
    metrics::describe_gauge!(CACHE_ENTRIES, "Session states held");
    metrics::describe_histogram!(
        REPLICATION_SECONDS,
        metrics::Unit::Seconds,
        "Replication lag: commit to replica acknowledged"
    );
    metrics::describe_counter!(REPLICATION_FAILURES, "Responses whose replica could not be written");
    metrics::describe_counter!(REPLICATION_FULL, "Replicas sent whole because the holder lacked the parent");
    metrics::describe_counter!(REPLICAS_STORED, "Replica batches received");
    metrics::describe_counter!(PULLS, "Chains pulled from their previous owner on a miss");
    metrics::describe_counter!(HANDED_OFF, "States handed to new owners while draining");
    metrics::describe_counter!(
        STATE_BYTES_SENT,
        metrics::Unit::Bytes,
        "Encoded session state sent to peers, by path (replicate or hand_off)"
    );
    metrics::describe_counter!(PULLED_BYTES, metrics::Unit::Bytes, "Encoded session state pulled from peers");
    metrics::describe_counter!(FENCED, "Times the worker lost its lease and stopped taking turns");
}
