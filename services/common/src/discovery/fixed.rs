//! Fixed membership from configuration: peers listed on the command line, no leases.
//! For running separate processes without etcd; a node that dies stays listed.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{BoxFuture, Discovery, DiscoveryError, Member, Members, NodeKind, Registration};

pub struct FixedDiscovery {
    workers: watch::Sender<Members>,
    shards: watch::Sender<Members>,
}

impl FixedDiscovery {
    pub fn new(workers: Vec<Member>, shards: Vec<Member>) -> Self {
        let members = |list: Vec<Member>| -> Members {
            Arc::new(list.into_iter().map(|m| (m.id.clone(), m)).collect::<BTreeMap<_, _>>())
        };
        FixedDiscovery { workers: watch::channel(members(workers)).0, shards: watch::channel(members(shards)).0 }
    }
}

/// Parses `id=url` pairs.
pub fn parse_member(text: &str) -> Result<Member, String> {
    match text.split_once('=') {
        Some((id, addr)) if !id.is_empty() && (addr.starts_with("http://") || addr.starts_with("https://")) => {
            Ok(Member { id: id.to_owned(), addr: addr.to_owned() })
        }
        _ => Err(format!("expected id=http://host:port, got {text:?}")),
    }
}

impl Discovery for FixedDiscovery {
    fn register(&self, _kind: NodeKind, _member: Member) -> BoxFuture<'_, Result<Registration, DiscoveryError>> {
        Box::pin(async { Ok(Registration::new(CancellationToken::new(), || Box::pin(async {}))) })
    }

    fn watch(&self, kind: NodeKind) -> watch::Receiver<Members> {
        match kind {
            NodeKind::Worker => self.workers.subscribe(),
            NodeKind::Shard => self.shards.subscribe(),
        }
    }

    fn lists_registrations(&self) -> bool {
        false
    }
}
