//! The other workers, as a [`NodeSet`] on the same ring the edges compute: where a key's
//! replica goes (its ring successor) and whom a new owner pulls a moved chain from.

use std::sync::Arc;
use std::time::Duration;

use tether_common::discovery::{Discovery, Member, NodeKind};
use tether_common::link::Link;
use tether_common::nodes::NodeSet;
use tether_common::tls::Tls;
use tether_proto::worker::v1::ListModelsRequest;
use tether_proto::worker::v1::worker_client::WorkerClient;
use tokio_util::sync::CancellationToken;

pub type PeerClient = WorkerClient<Link>;

#[derive(Clone)]
pub struct Peers {
    pub nodes: NodeSet<PeerClient>,
    pub self_id: Arc<str>,
}

impl Peers {
    pub fn start(discovery: &dyn Discovery, self_id: &str, tls: Option<Tls>, stop: CancellationToken) -> Self {
        let connect = Arc::new(move |member: &Member| {
            let channel = tether_common::link::connect(&member.addr, tls.as_ref())?;
            Some(WorkerClient::new(channel).max_decoding_message_size(256 << 20).max_encoding_message_size(256 << 20))
        });
        let probe = Arc::new(|mut client: PeerClient| -> tether_common::discovery::BoxFuture<'static, bool> {
            Box::pin(async move {
                matches!(
                    tokio::time::timeout(Duration::from_millis(500), client.list_models(ListModelsRequest {})).await,
                    Ok(Ok(_))
                )
            })
        });
        let nodes = NodeSet::start(discovery, NodeKind::Worker, connect, probe, Duration::from_millis(250), stop);
        Peers { nodes, self_id: Arc::from(self_id) }
    }

    /// Where `key`'s replica goes: its owner if that is not this worker, else its successor.
    pub fn replica_target(&self, key: u64) -> Option<(Arc<str>, PeerClient)> {
        match self.nodes.owner(key) {
            Some((id, client)) if *id != *self.self_id => Some((id, client)),
            _ => self.nodes.successor(key).filter(|(id, _)| **id != *self.self_id),
        }
    }

    /// Whom to ask for a state of `key` this worker lacks, in order: at most `limit` other
    /// live workers in ring order from the key, then the members this worker ejected. That is
    /// the previous owner (the one this worker took the key from), the replica holder, when
    /// several workers joined at once the earlier owner behind the other newcomers, and a
    /// draining worker whose hand-off has not reached this state yet.
    pub fn holders(&self, key: u64, limit: usize) -> Vec<(Arc<str>, PeerClient)> {
        self.nodes.holders(key, limit, &self.self_id)
    }

    /// Who held `key` before this worker (the owner were this worker not in the ring).
    pub fn previous_owner(&self, key: u64) -> Option<(Arc<str>, PeerClient)> {
        self.nodes.owner_without(key, &self.self_id).filter(|(id, _)| **id != *self.self_id)
    }
}
