//! Consistent-hash placement over live nodes (the `hashring` crate).
//!
//! The crate has no virtual nodes of its own, so each node is added as `vnodes` entries
//! `(id, replica)`. Its hasher is SipHash with fixed keys, so every process and build
//! computes the same ring: all edges agree on a key's owner without talking to each other.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;

use hashring::HashRing;

/// One virtual node: a node id and its replica number.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct VirtualNode {
    node: String,
    replica: u32,
}

/// A ring of node ids with virtual nodes.
#[derive(Clone)]
pub struct Ring {
    ring: HashRing<VirtualNode>,
    nodes: BTreeSet<String>,
    vnodes: u32,
    /// Per node, the ring without it (built on first use): who inherits its keys.
    without: BTreeMap<String, OnceLock<Box<HashRing<VirtualNode>>>>,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring").field("nodes", &self.nodes).field("vnodes", &self.vnodes).finish()
    }
}

pub const DEFAULT_VNODES: u32 = 128;

impl Ring {
    /// Builds the ring of `nodes` with `vnodes` virtual nodes each.
    pub fn new<'a>(nodes: impl IntoIterator<Item = &'a str>, vnodes: u32) -> Self {
        let nodes: BTreeSet<String> = nodes.into_iter().map(str::to_owned).collect();
        let ring = build(nodes.iter(), vnodes);
        let without = nodes.iter().map(|node| (node.clone(), OnceLock::new())).collect();
        Ring { ring, nodes, vnodes, without }
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn nodes(&self) -> impl Iterator<Item = &str> {
        self.nodes.iter().map(String::as_str)
    }

    pub fn contains(&self, node: &str) -> bool {
        self.nodes.contains(node)
    }

    /// Returns the owner of `key`.
    pub fn owner(&self, key: u64) -> Option<&str> {
        self.ring.get(&key).map(|vnode| vnode.node.as_str())
    }

    /// Returns the ring successor of `key`: the next distinct node, i.e. the node that owns
    /// the key once its owner leaves. It holds the key's replica.
    pub fn successor(&self, key: u64) -> Option<&str> {
        let owner = self.owner(key)?;
        let without = self
            .without
            .get(owner)?
            .get_or_init(|| Box::new(build(self.nodes.iter().filter(|n| *n != owner), self.vnodes)));
        without.get(&key).map(|vnode| {
            // The node names live in `self.nodes`; return that borrow, not the sub-ring's.
            self.nodes.get(&vnode.node).expect("sub-ring nodes are ring nodes").as_str()
        })
    }

    /// Every node in ring order from `key`: its owner, its successor, then the node that
    /// would own the key were those two gone, and so on. After several nodes joined at once,
    /// the key's earlier owner is further down this walk than the successor.
    pub fn walk(&self, key: u64) -> Vec<&str> {
        let mut walk: Vec<&str> = Vec::with_capacity(self.nodes.len());
        for vnode in self.ring.get_with_replicas(&key, usize::MAX).unwrap_or_default() {
            let node = self.nodes.get(&vnode.node).expect("ring nodes are known").as_str();
            if !walk.contains(&node) {
                walk.push(node);
                if walk.len() == self.nodes.len() {
                    break;
                }
            }
        }
        walk
    }
}

fn build<'a>(nodes: impl Iterator<Item = &'a String>, vnodes: u32) -> HashRing<VirtualNode> {
    let mut ring = HashRing::new();
    ring.batch_add(
        nodes.flat_map(|node| (0..vnodes).map(move |replica| VirtualNode { node: node.clone(), replica })).collect(),
    );
    ring
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::Ring;

    #[test]
    fn keys_spread_and_only_a_removed_nodes_keys_move() {
        let ring = Ring::new(["w1", "w2", "w3"], 128);
        let mut counts: HashMap<String, usize> = HashMap::new();
        let owners: Vec<String> =
            (0..10_000u64).map(|k| ring.owner(k.wrapping_mul(0x9e37_79b9_7f4a_7c15)).unwrap().to_owned()).collect();
        for owner in &owners {
            *counts.entry(owner.clone()).or_default() += 1;
        }
        for (node, count) in &counts {
            assert!((2_500..4_200).contains(count), "{node} got {count} of 10000");
        }
        let smaller = Ring::new(["w1", "w3"], 128);
        for (k, before) in (0..10_000u64).zip(&owners) {
            let after = smaller.owner(k.wrapping_mul(0x9e37_79b9_7f4a_7c15)).unwrap();
            if before != "w2" {
                assert_eq!(after, before, "a key not owned by w2 moved");
            }
        }
    }

    #[test]
    fn successor_inherits_the_key_when_the_owner_leaves() {
        let ring = Ring::new(["a", "b", "c", "d"], 64);
        for key in 0..500u64 {
            let owner = ring.owner(key).unwrap();
            let successor = ring.successor(key).unwrap();
            assert_ne!(owner, successor);
            let rest: Vec<&str> = ["a", "b", "c", "d"].into_iter().filter(|n| *n != owner).collect();
            assert_eq!(Ring::new(rest, 64).owner(key), Some(successor));
        }
        assert!(Ring::new(["solo"], 8).successor(1).is_none());
        assert!(Ring::new([], 8).owner(1).is_none());
    }

    #[test]
    fn the_walk_lists_who_owns_the_key_as_nodes_before_it_leave() {
        let nodes = ["a", "b", "c", "d", "e"];
        let ring = Ring::new(nodes, 64);
        for key in 0..300u64 {
            let walk = ring.walk(key);
            assert_eq!(walk.len(), nodes.len());
            assert_eq!(walk[0], ring.owner(key).unwrap());
            assert_eq!(walk[1], ring.successor(key).unwrap());
            for gone in 1..nodes.len() {
                let rest: Vec<&str> = nodes.into_iter().filter(|n| !walk[..gone].contains(n)).collect();
                assert_eq!(Ring::new(rest, 64).owner(key), Some(walk[gone]), "key {key} without {:?}", &walk[..gone]);
            }
        }
        assert!(Ring::new([], 8).walk(1).is_empty());
    }

    #[test]
    fn rings_built_in_any_order_agree() {
        let a = Ring::new(["x", "y", "z"], 32);
        let b = Ring::new(["z", "x", "y"], 32);
        for key in 0..1000u64 {
            assert_eq!(a.owner(key), b.owner(key));
        }
    }
}
