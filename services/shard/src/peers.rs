//! The other shards, as a [`NodeSet`] on the same ring the workers compute (same node ids,
//! same vnodes): where a session goes once this shard has left, so a draining shard can hand
//! its KV caches to exactly the shards the workers will route those sessions to next.

use std::sync::Arc;
use std::time::Duration;

use tether_common::discovery::{BoxFuture, Discovery, Member, NodeKind};
use tether_common::link::Link;
use tether_common::nodes::NodeSet;
use tether_common::tls::Tls;
use tether_proto::shard::v1::InfoRequest;
use tether_proto::shard::v1::shard_client::ShardClient;
use tokio_util::sync::CancellationToken;

pub type PeerClient = ShardClient<Link>;

/// Largest gRPC message a shard sends or accepts: an exported llama session is about 23 KB per
/// token (dependencies.md §4), so a full 8192-token context is about 190 MB.
pub const MAX_MESSAGE_BYTES: usize = 256 << 20;

#[derive(Clone)]
pub struct ShardPeers {
    pub nodes: NodeSet<PeerClient>,
    pub self_id: Arc<str>,
}

impl ShardPeers {
    /// Follows shard membership until `stop`.
    pub fn start(discovery: &dyn Discovery, self_id: &str, tls: Option<Tls>, stop: CancellationToken) -> Self {
        let connect = Arc::new(move |member: &Member| {
            let channel = tether_common::link::connect(&member.addr, tls.as_ref())?;
            Some(
                ShardClient::new(channel)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            )
        });
        let probe = Arc::new(|mut client: PeerClient| -> BoxFuture<'static, bool> {
            Box::pin(async move {
                matches!(tokio::time::timeout(Duration::from_millis(500), client.info(InfoRequest {})).await, Ok(Ok(_)))
            })
        });
        let nodes = NodeSet::start(discovery, NodeKind::Shard, connect, probe, Duration::from_millis(250), stop);
        ShardPeers { nodes, self_id: Arc::from(self_id) }
    }

    /// Returns who owns `session` once this shard has left the ring (`None` if no other shard).
    pub fn next_owner(&self, session: u64) -> Option<(Arc<str>, PeerClient)> {
        self.nodes.owner_without(session, &self.self_id).filter(|(id, _)| **id != *self.self_id)
    }
}
