//! The worker's shared context: everything a turn, a replication, a pull or a hand-off needs
//! from its worker (the session cache, the shard pool, the peers, the renderers, the safety
//! classifier, the budgets, the turns in flight). It imports neither the pipeline nor
//! replication, so both stand above it.

use std::sync::Arc;

use tether_common::ops::Readiness;

use crate::budget::PrefillBudget;
use crate::config::ReplicationMode;
use crate::in_flight::InFlight;
use crate::peers::Peers;
use crate::safety::Classifier;
use crate::session::{HeldPrompts, SessionCache};
use crate::shard_pool::ShardPool;
use crate::stats::WorkerStats;
use crate::tokenizer::Renderers;

/// Everything a turn needs from its worker.
pub struct WorkerContext {
    pub id: String,
    pub cache: SessionCache,
    /// What the shards hold for each stateless session (its last prompt and output).
    pub held: HeldPrompts,
    pub shards: ShardPool,
    /// Renders prompts with each model's tokenizer.
    pub renderer: Renderers,
    pub classifier: Arc<dyn Classifier>,
    pub default_model: String,
    pub serving: Readiness,
    pub peers: Peers,
    pub replication: ReplicationMode,
    /// Each tenant's budget of uncached prefill tokens.
    pub prefill_budget: PrefillBudget,
    /// The turns in flight, by response id (what a cancel finds).
    pub in_flight: Arc<InFlight>,
    /// Counters for the operator view (`Status`).
    pub stats: WorkerStats,
}
