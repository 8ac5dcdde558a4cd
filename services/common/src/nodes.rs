//! A followed set of nodes of one kind: membership from discovery, one client per node, and
//! the consistent-hash ring over the nodes that are members and not ejected.
//!
//! Ejection is the data plane's fast path: a refused connection or a broken stream takes a
//! node out of this process's ring at once, without waiting for its lease to expire. An
//! ejected node comes back when a probe succeeds (it answers again) while membership still
//! lists it. Edges, workers and the worker's shard pool all route through a `NodeSet`.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use tokio_util::sync::CancellationToken;

use crate::discovery::{BoxFuture, Discovery, Member, Members, NodeKind};
use crate::placement::{DEFAULT_VNODES, Ring};
use crate::tls::Tls;

pub const EJECTIONS: &str = "tether_node_ejections_total";
pub const MEMBERSHIP_CHANGES: &str = "tether_node_membership_changes_total";
pub const LIVE_NODES: &str = "tether_node_live";

/// Builds a node's client from its membership entry.
pub type Connect<C> = Arc<dyn Fn(&Member) -> Option<C> + Send + Sync>;
/// Checks whether an ejected node answers again.
pub type Probe<C> = Arc<dyn Fn(C) -> BoxFuture<'static, bool> + Send + Sync>;

struct View<C> {
    /// The live nodes: members, not ejected. Routing uses this one.
    ring: Ring,
    /// Every member, ejected ones included (rebuilt on membership change only).
    members: Ring,
    nodes: HashMap<String, (String, C)>,
    ejected: BTreeSet<String>,
}

impl<C> View<C> {
    fn rebuild(&mut self) {
        let live: Vec<&str> = self.nodes.keys().filter(|id| !self.ejected.contains(*id)).map(String::as_str).collect();
        // From the previous ring: only a joining node's points are hashed.
        self.ring = self.ring.rebuilt(live);
    }
}

pub struct NodeSet<C> {
    kind: NodeKind,
    view: Arc<RwLock<View<C>>>,
    members: tokio::sync::watch::Receiver<Members>,
}

impl<C> Clone for NodeSet<C> {
    fn clone(&self) -> Self {
        NodeSet { kind: self.kind, view: self.view.clone(), members: self.members.clone() }
    }
}

impl<C: Clone + Send + Sync + 'static> NodeSet<C> {
    /// Follows the members of `kind` until `stop`, probing ejected nodes every `probe_every`.
    pub fn start(
        discovery: &dyn Discovery,
        kind: NodeKind,
        connect: Connect<C>,
        probe: Probe<C>,
        probe_every: Duration,
        stop: CancellationToken,
    ) -> Self {
        let mut members = discovery.watch(kind);
        let set = NodeSet {
            kind,
            view: Arc::new(RwLock::new(View {
                ring: Ring::new([], DEFAULT_VNODES),
                members: Ring::new([], DEFAULT_VNODES),
                nodes: HashMap::new(),
                ejected: BTreeSet::new(),
            })),
            members: members.clone(),
        };
        set.apply(&members.borrow_and_update().clone(), &connect);
        let follower = set.clone();
        let membership_stop = stop.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = membership_stop.cancelled() => break,
                    changed = members.changed() => {
                        if changed.is_err() { break }
                        let snapshot = members.borrow_and_update().clone();
                        follower.apply(&snapshot, &connect);
                    }
                }
            }
        });
        let prober = set.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(probe_every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => prober.probe_ejected(&probe).await,
                }
            }
        });
        set
    }

    fn apply(&self, members: &Members, connect: &Connect<C>) {
        let mut view = self.view.write();
        view.nodes.retain(|id, (addr, _)| members.get(id).is_some_and(|m| &m.addr == addr));
        for member in members.values() {
            if !view.nodes.contains_key(&member.id) {
                match connect(member) {
                    Some(client) => {
                        view.nodes.insert(member.id.clone(), (member.addr.clone(), client));
                    }
                    None => tracing::warn!(node = %member.id, "member address unusable; ignored"),
                }
            }
        }
        let nodes = &view.nodes;
        let still_members: BTreeSet<String> =
            view.ejected.iter().filter(|id| nodes.contains_key(*id)).cloned().collect();
        view.ejected = still_members;
        view.members = view.members.rebuilt(view.nodes.keys().map(String::as_str));
        view.rebuild();
        metrics::counter!(MEMBERSHIP_CHANGES, "kind" => self.kind.as_str()).increment(1);
        metrics::gauge!(LIVE_NODES, "kind" => self.kind.as_str()).set(view.ring.len() as f64);
        tracing::info!(
            kind = self.kind.as_str(),
            members = view.nodes.len(),
            live = view.ring.len(),
            "membership changed"
        );
    }

    async fn probe_ejected(&self, probe: &Probe<C>) {
        let ejected: Vec<(String, C)> = {
            let view = self.view.read();
            view.ejected.iter().filter_map(|id| view.nodes.get(id).map(|(_, c)| (id.clone(), c.clone()))).collect()
        };
        for (id, client) in ejected {
            if probe(client).await {
                let mut view = self.view.write();
                if view.ejected.remove(&id) {
                    view.rebuild();
                    tracing::info!(kind = self.kind.as_str(), node = %id, "ejected node answers again; readmitted");
                }
            }
        }
    }

    /// Takes a node out of this process's ring at once (it refused or broke a call).
    pub fn eject(&self, id: &str) {
        let mut view = self.view.write();
        if view.nodes.contains_key(id) && view.ejected.insert(id.to_owned()) {
            view.rebuild();
            metrics::counter!(EJECTIONS, "kind" => self.kind.as_str()).increment(1);
            metrics::gauge!(LIVE_NODES, "kind" => self.kind.as_str()).set(view.ring.len() as f64);
            tracing::warn!(kind = self.kind.as_str(), node = %id, "node ejected");
        }
    }

    /// Returns the owner of `key` among the live nodes.
    pub fn owner(&self, key: u64) -> Option<(Arc<str>, C)> {
        let view = self.view.read();
        let id = view.ring.owner(key)?;
        view.nodes.get(id).map(|(_, client)| (Arc::from(id), client.clone()))
    }

    /// Returns the ring successor of `key`: who inherits it when its owner leaves.
    pub fn successor(&self, key: u64) -> Option<(Arc<str>, C)> {
        let view = self.view.read();
        let id = view.ring.successor(key)?;
        view.nodes.get(id).map(|(_, client)| (Arc::from(id), client.clone()))
    }

    /// Returns the owner of `key` if `node` were not in the ring.
    pub fn owner_without(&self, key: u64, node: &str) -> Option<(Arc<str>, C)> {
        let view = self.view.read();
        let id = match view.ring.owner(key)? {
            owner if owner == node => view.ring.successor(key)?,
            owner => owner,
        };
        view.nodes.get(id).map(|(_, client)| (Arc::from(id), client.clone()))
    }

    /// Who may hold a copy of `key`'s state, `skip` (the asking node) left out: up to `limit`
    /// live nodes in ring order from the key, then every ejected member in ring order.
    /// Ejection only stops routing: a node that refused a call because it drains still holds,
    /// and serves, the states it has not handed off yet, so a lookup that missed on the live
    /// nodes asks it too (last: an ejected node may also be frozen or dead).
    pub fn holders(&self, key: u64, limit: usize, skip: &str) -> Vec<(Arc<str>, C)> {
        let view = self.view.read();
        let live = view.ring.walk(key).filter(|id| *id != skip).take(limit);
        // The walk is lazy: it stops once every ejected member was met (at once when none is).
        let ejected = view
            .members
            .walk(key)
            .filter(|id| view.ejected.contains(*id))
            .take(view.ejected.len())
            .filter(|id| *id != skip);
        live.chain(ejected)
            .filter_map(|id| view.nodes.get(id).map(|(_, client)| (Arc::from(id), client.clone())))
            .collect()
    }

    /// Returns the owner of `key` among all members, ejected ones included (its home).
    pub fn home(&self, key: u64) -> Option<Arc<str>> {
        self.view.read().members.owner(key).map(Arc::from)
    }

    /// Every member with its client and whether it is live (not ejected), by id.
    pub fn all(&self) -> Vec<(Arc<str>, C, bool)> {
        let view = self.view.read();
        let mut all: Vec<(Arc<str>, C, bool)> = view
            .nodes
            .iter()
            .map(|(id, (_, client))| (Arc::from(id.as_str()), client.clone(), !view.ejected.contains(id)))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    pub fn get(&self, id: &str) -> Option<C> {
        self.view.read().nodes.get(id).map(|(_, client)| client.clone())
    }

    /// Every live node.
    pub fn live(&self) -> Vec<(Arc<str>, C)> {
        let view = self.view.read();
        view.ring.nodes().filter_map(|id| view.nodes.get(id).map(|(_, c)| (Arc::from(id), c.clone()))).collect()
    }

    pub fn is_live(&self, id: &str) -> bool {
        self.view.read().ring.contains(id)
    }

    /// Live nodes in this process's view.
    pub fn len(&self) -> usize {
        self.view.read().ring.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The membership as discovery reports it (ejected nodes included).
    pub fn members(&self) -> Members {
        self.members.borrow().clone()
    }
}

/// A connection that received nothing for this long is pinged.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_millis(250);
/// A ping not answered within this closes the connection and fails its calls, so a peer that
/// stopped (SIGSTOP, a frozen VM, a partition) is noticed within interval + timeout, about a
/// second, rather than when its lease expires: the edge continues the responses that were in
/// flight on it elsewhere (see the edge's relay). The ping is answered by the peer's HTTP/2
/// layer, not by its work, so a long prefill or a busy peer keeps its connections.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_millis(600);

/// Opens a lazily connected, persistent gRPC channel to a node's address: no Nagle delay, a
/// short connect timeout and HTTP/2 keep-alives that notice a dead or stopped peer. With `tls` the
/// address must be `https://host:port`: the channel speaks mutual TLS (the node must present a
/// certificate from the cluster CA for `host`, and this node presents its own); without, it
/// must be `http://host:port`. `None` for an address that is not a URL of the plane's scheme.
pub fn channel(addr: &str, tls: Option<&Tls>) -> Option<tonic::transport::Channel> {
    if let Err(error) = crate::tls::check_url(addr, tls) {
        tracing::warn!(%error, "node address unusable");
        return None;
    }
    let mut endpoint = tonic::transport::Endpoint::from_shared(addr.to_owned())
        .ok()?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(1))
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    if let Some(tls) = tls {
        endpoint = endpoint
            .tls_config(tls.client_config())
            .inspect_err(|error| tracing::warn!(%error, addr, "TLS configuration refused"))
            .ok()?;
    }
    Some(endpoint.connect_lazy())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::fixed::FixedDiscovery;

    fn member(id: &str) -> Member {
        Member { id: id.to_owned(), addr: format!("http://{id}.invalid:1") }
    }

    #[tokio::test]
    async fn a_lookup_asks_ejected_members_after_the_live_nodes() {
        let nodes = ["a", "b", "c", "d"];
        let discovery = FixedDiscovery::new(nodes.iter().copied().map(member).collect(), Vec::new());
        let connect: Connect<()> = Arc::new(|_: &Member| Some(()));
        let never: Probe<()> = Arc::new(|()| Box::pin(async { false }));
        let stop = CancellationToken::new();
        let set = NodeSet::start(&discovery, NodeKind::Worker, connect, never, Duration::from_secs(3600), stop.clone());
        let key = 42;
        let walk: Vec<String> = set.holders(key, 8, "").into_iter().map(|(id, ())| id.to_string()).collect();
        assert_eq!(walk.len(), 4, "every node, in ring order: {walk:?}");

        // The key's owner refuses a call (it drains) and is ejected: no more turns go to it,
        // but it still holds the key's states, so it stays on the list, after the live nodes.
        let (asker, owner) = (walk[1].as_str(), walk[0].as_str());
        set.eject(owner);
        let ids: Vec<String> = set.holders(key, 8, asker).into_iter().map(|(id, ())| id.to_string()).collect();
        let live: Vec<String> = walk[2..].to_vec();
        assert_eq!(ids, [live, vec![owner.to_owned()]].concat());
        // The live part is bounded; the ejected members are always asked.
        let one: Vec<String> = set.holders(key, 1, asker).into_iter().map(|(id, ())| id.to_string()).collect();
        assert_eq!(one, [walk[2].clone(), owner.to_owned()]);
        stop.cancel();
    }

    #[tokio::test]
    async fn an_ejected_node_stays_the_home_of_its_keys() {
        let discovery = FixedDiscovery::new(["a", "b", "c"].into_iter().map(member).collect(), Vec::new());
        let connect: Connect<()> = Arc::new(|_: &Member| Some(()));
        let never: Probe<()> = Arc::new(|()| Box::pin(async { false }));
        let stop = CancellationToken::new();
        let set = NodeSet::start(&discovery, NodeKind::Worker, connect, never, Duration::from_secs(3600), stop.clone());
        let key = 7;
        let (owner, ()) = set.owner(key).unwrap();
        set.eject(&owner);
        assert_eq!(set.home(key), Some(owner.clone()), "the home is the owner among all members");
        assert_ne!(set.owner(key).map(|(id, ())| id), Some(owner.clone()), "turns go elsewhere");
        let all: Vec<(String, bool)> = set.all().into_iter().map(|(id, (), live)| (id.to_string(), live)).collect();
        assert_eq!(all.len(), 3);
        assert!(all.iter().all(|(id, live)| *live == (**id != *owner)), "{all:?}");
        stop.cancel();
    }
}
