//! The worker's view of the shards: membership from discovery, a consistent-hash ring that
//! pins each session to one shard (so its KV cache stays warm), and one persistent HTTP/2
//! channel per shard. Calls go through [`ShardApi`], so tests can wrap a shard with faults.

mod grpc;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tether_common::discovery::{BoxFuture, Discovery, Member, NodeKind};
use tether_common::nodes::NodeSet;
use tether_common::tls::Tls;
use tether_proto::shard::v1::{GenerateChunk, GenerateRequest};
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::Status;

pub use grpc::GrpcShard;

pub type ChunkStream = std::pin::Pin<Box<dyn Stream<Item = Result<GenerateChunk, Status>> + Send>>;

/// One shard, as the pipeline calls it.
pub trait ShardApi: Send + Sync + 'static {
    fn generate(&self, request: GenerateRequest) -> BoxFuture<'_, Result<ChunkStream, Status>>;
    /// The models the shard serves (known once it answered `Info`).
    fn models(&self) -> Vec<String>;
    /// Tokens one session can hold on this shard (its model's context window, prompt plus
    /// output), known once it answered `Info`; 0 while unknown.
    fn context_window(&self) -> u32 {
        0
    }
    /// Whether the shard's engine can constrain a text answer to JSON (`text.format`
    /// json_schema / json_object), known once it answered `Info`; false while unknown.
    fn structured_outputs(&self) -> bool {
        false
    }
    /// Whether the shard answers (an ejected shard is readmitted when it does).
    fn probe(&self) -> BoxFuture<'static, bool>;
}

/// Builds the client of a shard member; the default dials gRPC.
/// `None` for an address it cannot dial (not a URL of the plane's scheme).
pub type ShardConnector = Arc<dyn Fn(&str, &str) -> Option<Arc<dyn ShardApi>> + Send + Sync>;

/// How a turn picks its shard.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ShardPlacement {
    /// A session's owner on the shard ring, every turn: its KV cache stays warm there.
    #[default]
    Affinity,
    /// The live shards in turn, whatever the session: the baseline the affinity benchmark
    /// compares against (a follow-up usually lands where its prefix is not held).
    RoundRobin,
}

/// The shards, as a [`NodeSet`]: a session's shard is its owner on the shard ring, so its
/// KV cache stays warm there.
#[derive(Clone)]
pub struct ShardPool {
    nodes: NodeSet<Arc<dyn ShardApi>>,
    placement: ShardPlacement,
    turns: Arc<std::sync::atomic::AtomicUsize>,
}

impl ShardPool {
    /// Starts following shard membership until `stop`.
    pub fn start(discovery: &dyn Discovery, connector: ShardConnector, stop: CancellationToken) -> Self {
        let connect = Arc::new(move |member: &Member| connector(&member.id, &member.addr));
        let probe = Arc::new(|shard: Arc<dyn ShardApi>| -> BoxFuture<'static, bool> {
            Box::pin(async move { shard.probe().await })
        });
        ShardPool {
            nodes: NodeSet::start(discovery, NodeKind::Shard, connect, probe, Duration::from_millis(250), stop),
            placement: ShardPlacement::Affinity,
            turns: Arc::default(),
        }
    }

    /// Sets how turns pick their shard.
    pub fn with_placement(mut self, placement: ShardPlacement) -> Self {
        self.placement = placement;
        self
    }

    /// Returns the shards to try for `session`, in order: its owner, then its successor
    /// (with round-robin placement: the next live shard in turn, then the one after it).
    pub fn candidates(&self, session: u64) -> Vec<(String, Arc<dyn ShardApi>)> {
        if self.placement == ShardPlacement::RoundRobin {
            let live = self.nodes.live();
            if !live.is_empty() {
                let next = self.turns.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let picks = live.len().min(2);
                return (0..picks)
                    .map(|offset| {
                        let (id, api) = &live[(next + offset) % live.len()];
                        (id.to_string(), api.clone())
                    })
                    .collect();
            }
        }
        let owner = self.nodes.owner(session);
        let successor = self.nodes.successor(session);
        [owner, successor].into_iter().flatten().map(|(id, api)| (id.to_string(), api)).collect()
    }

    /// Takes a shard that refused a call out of this worker's ring.
    pub fn eject(&self, id: &str) {
        self.nodes.eject(id);
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Returns the union of the models the shards serve.
    pub fn models(&self) -> Vec<String> {
        let models: BTreeSet<String> = self.nodes.live().into_iter().flat_map(|(_, api)| api.models()).collect();
        models.into_iter().collect()
    }

    /// Whether `model` is served; `None` while no shard has described itself yet.
    pub fn serves(&self, model: &str) -> Option<bool> {
        let models = self.models();
        if models.is_empty() { None } else { Some(models.iter().any(|m| m == model)) }
    }

    /// Returns `model`'s context window: the smallest any live shard serving it reports (a
    /// turn may land on any of them), `None` while none has described its window.
    pub fn context_window(&self, model: &str) -> Option<u32> {
        self.nodes
            .live()
            .into_iter()
            .filter(|(_, api)| api.models().iter().any(|m| m == model))
            .map(|(_, api)| api.context_window())
            .filter(|&window| window > 0)
            .min()
    }
}

impl ShardPool {
    /// Whether every live shard serving `model` can constrain its output to JSON (a turn may
    /// land on any of them); `None` while none serving it has described itself.
    pub fn structured_outputs(&self, model: &str) -> Option<bool> {
        let serving: Vec<bool> = self
            .nodes
            .live()
            .into_iter()
            .filter(|(_, api)| api.models().iter().any(|m| m == model))
            .map(|(_, api)| api.structured_outputs())
            .collect();
        (!serving.is_empty()).then(|| serving.iter().all(|&able| able))
    }
}

/// Returns the connector that dials shards over gRPC (mutual TLS with `tls`).
pub fn grpc_connector(tls: Option<Tls>) -> ShardConnector {
    Arc::new(move |id: &str, addr: &str| {
        GrpcShard::connect(id, addr, tls.as_ref()).map(|shard| Arc::new(shard) as Arc<dyn ShardApi>)
    })
}
