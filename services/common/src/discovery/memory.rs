//! In-process membership: a map behind a lock with a watch channel per kind.
//!
//! Used by `tether dev` and by the in-process test harness, which can also expire a member
//! as if its lease had run out.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{BoxFuture, Discovery, DiscoveryError, Member, Members, NodeKind, Registration};

#[derive(Clone, Default)]
pub struct MemoryDiscovery {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    channels: HashMap<NodeKind, watch::Sender<Members>>,
    /// The lease of each member: its generation (so a stale registration cannot remove a
    /// newer one) and the token cancelled when it is lost.
    leases: HashMap<(NodeKind, String), (u64, CancellationToken)>,
    next_generation: u64,
}

impl State {
    fn channel(&mut self, kind: NodeKind) -> &watch::Sender<Members> {
        self.channels.entry(kind).or_insert_with(|| watch::channel(Members::default()).0)
    }

    fn update(&mut self, kind: NodeKind, change: impl FnOnce(&mut BTreeMap<String, Member>)) {
        self.channel(kind).send_modify(|members| change(Arc::make_mut(members)));
    }
}

impl MemoryDiscovery {
    pub fn new() -> Self {
        Self::default()
    }

    /// Removes a member as if its lease had expired, and tells it so.
    pub fn expire(&self, kind: NodeKind, id: &str) {
        let mut state = self.inner.state.lock();
        if let Some((_, lost)) = state.leases.remove(&(kind, id.to_owned())) {
            lost.cancel();
        }
        state.update(kind, |members| {
            members.remove(id);
        });
    }

    /// How many receivers watch `kind`: each is woken once per change of it.
    pub fn watchers(&self, kind: NodeKind) -> usize {
        self.inner.state.lock().channel(kind).receiver_count()
    }

    /// Returns the current members of `kind`.
    pub fn members(&self, kind: NodeKind) -> Members {
        self.inner.state.lock().channel(kind).borrow().clone()
    }
}

impl Discovery for MemoryDiscovery {
    fn register(&self, kind: NodeKind, member: Member) -> BoxFuture<'_, Result<Registration, DiscoveryError>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let lost = CancellationToken::new();
            let id = member.id.clone();
            let generation = {
                let mut state = inner.state.lock();
                if state.leases.contains_key(&(kind, id.clone())) {
                    return Err(DiscoveryError::Duplicate(id));
                }
                state.next_generation += 1;
                let generation = state.next_generation;
                state.leases.insert((kind, id.clone()), (generation, lost.clone()));
                state.update(kind, |members| {
                    members.insert(id.clone(), member);
                });
                generation
            };
            Ok(Registration::new(lost, move || {
                Box::pin(async move {
                    let mut state = inner.state.lock();
                    // Only remove the entry this registration owns.
                    let owned = state.leases.get(&(kind, id.clone())).is_some_and(|(g, _)| *g == generation);
                    if owned {
                        state.leases.remove(&(kind, id.clone()));
                        state.update(kind, |members| {
                            members.remove(&id);
                        });
                    }
                })
            }))
        })
    }

    fn watch(&self, kind: NodeKind) -> watch::Receiver<Members> {
        self.inner.state.lock().channel(kind).subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::MemoryDiscovery;
    use crate::discovery::{Discovery, Member, NodeKind};

    fn member(id: &str) -> Member {
        Member { id: id.into(), addr: format!("http://{id}") }
    }

    #[tokio::test]
    async fn register_watch_revoke_and_expire() {
        let discovery = MemoryDiscovery::new();
        let mut watch = discovery.watch(NodeKind::Worker);
        let a = discovery.register(NodeKind::Worker, member("a")).await.unwrap();
        let b = discovery.register(NodeKind::Worker, member("b")).await.unwrap();
        assert!(watch.has_changed().unwrap());
        assert_eq!(watch.borrow_and_update().keys().collect::<Vec<_>>(), ["a", "b"]);
        assert!(discovery.register(NodeKind::Worker, member("a")).await.is_err());

        a.revoke().await;
        assert_eq!(discovery.members(NodeKind::Worker).keys().collect::<Vec<_>>(), ["b"]);

        let lost = b.lost();
        discovery.expire(NodeKind::Worker, "b");
        assert!(lost.is_cancelled());
        assert!(discovery.members(NodeKind::Worker).is_empty());
        assert!(discovery.members(NodeKind::Shard).is_empty());
    }
}
