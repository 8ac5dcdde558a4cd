//! Consistent-hash placement over live nodes.
//!
//! Each node stands on the ring at `vnodes` points, the SipHash (fixed keys, via the `hashring`
//! crate's hasher) of `(id, replica)`; a key belongs to the first point at or after its own
//! hash. Every process and build computes the same ring, so all edges agree on a key's owner
//! without talking to each other, and the positions are those the `hashring` crate computed
//! before (a rolling upgrade keeps every session where it was).
//!
//! A point is 16 bytes (its hash and the index of its node's name), so a ring of 1,000 nodes
//! × 128 points is 2 MiB. Walking the ring from a key (its owner, then who inherits it) reads
//! points in place and stops at the nodes asked for: a lookup costs a few points, not a copy
//! of the ring.

use std::hash::BuildHasher;

use hashring::DefaultHashBuilder;

/// What a point's position hashes (field order and types fix the positions).
#[derive(Hash)]
struct VirtualNode<'a> {
    node: &'a str,
    replica: u32,
}

/// A ring of node ids with virtual nodes.
#[derive(Clone, PartialEq, Eq)]
pub struct Ring {
    /// `(position, index into names)`, sorted by position.
    points: Vec<(u64, u32)>,
    /// The node ids, sorted.
    names: Vec<String>,
    vnodes: u32,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring").field("nodes", &self.names).field("vnodes", &self.vnodes).finish()
    }
}

pub const DEFAULT_VNODES: u32 = 128;

impl Ring {
    /// Builds the ring of `nodes` with `vnodes` virtual nodes each.
    pub fn new<'a>(nodes: impl IntoIterator<Item = &'a str>, vnodes: u32) -> Self {
        let mut names: Vec<String> = nodes.into_iter().map(str::to_owned).collect();
        names.sort_unstable();
        names.dedup();
        let hasher = DefaultHashBuilder;
        let mut points: Vec<(u64, u32)> = Vec::with_capacity(names.len() * vnodes as usize);
        for (index, node) in names.iter().enumerate() {
            for replica in 0..vnodes {
                // `String` and `&str` hash alike: the positions the `hashring` crate computed.
                points.push((hasher.hash_one(VirtualNode { node, replica }), index as u32));
            }
        }
        // Equal positions keep the order the crate gave them: by node id (the names are sorted).
        points.sort_by_key(|&(position, index)| (position, index));
        Ring { points, names, vnodes }
    }

    /// Builds the ring of `nodes` from this one: the points of nodes in both are kept, only a
    /// joining node's points are hashed, and the two sorted runs are merged. The result equals
    /// [`Ring::new`] of `nodes` (equal positions are ordered by node id, as there), at the cost
    /// of a pass over the points instead of hashing and sorting them all.
    pub fn rebuilt<'a>(&self, nodes: impl IntoIterator<Item = &'a str>) -> Self {
        let mut names: Vec<String> = nodes.into_iter().map(str::to_owned).collect();
        names.sort_unstable();
        names.dedup();
        let index_of = |name: &str| names.binary_search_by(|n| n.as_str().cmp(name)).ok().map(|i| i as u32);
        let renumbered: Vec<Option<u32>> = self.names.iter().map(|name| index_of(name)).collect();
        let kept = self.points.iter().filter_map(|&(position, old)| Some((position, renumbered[old as usize]?)));
        let hasher = DefaultHashBuilder;
        let mut joined: Vec<(u64, u32)> = Vec::new();
        for (index, node) in names.iter().enumerate() {
            if !self.contains(node) {
                for replica in 0..self.vnodes {
                    joined.push((hasher.hash_one(VirtualNode { node, replica }), index as u32));
                }
            }
        }
        joined.sort_unstable();
        let mut points = Vec::with_capacity(names.len() * self.vnodes as usize);
        let mut joined = joined.into_iter().peekable();
        for point in kept {
            while let Some(&next) = joined.peek().filter(|next| **next < point) {
                points.push(next);
                joined.next();
            }
            points.push(point);
        }
        points.extend(joined);
        Ring { points, names, vnodes: self.vnodes }
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn nodes(&self) -> impl Iterator<Item = &str> {
        self.names.iter().map(String::as_str)
    }

    pub fn contains(&self, node: &str) -> bool {
        self.names.binary_search_by(|name| name.as_str().cmp(node)).is_ok()
    }

    /// The index of the first point at or after `key`'s position, wrapping.
    fn start(&self, key: u64) -> usize {
        let position = DefaultHashBuilder.hash_one(key);
        match self.points.binary_search_by(|(p, _)| p.cmp(&position)) {
            Ok(at) | Err(at) if at < self.points.len() => at,
            _ => 0,
        }
    }

    /// Returns the owner of `key`.
    pub fn owner(&self, key: u64) -> Option<&str> {
        if self.points.is_empty() {
            return None;
        }
        Some(&self.names[self.points[self.start(key)].1 as usize])
    }

    /// Returns the ring successor of `key`: the next distinct node, i.e. the node that owns
    /// the key once its owner leaves. It holds the key's replica.
    pub fn successor(&self, key: u64) -> Option<&str> {
        self.walk(key).nth(1)
    }

    /// Every node in ring order from `key`: its owner, its successor, then the node that
    /// would own the key were those two gone, and so on. After several nodes joined at once,
    /// the key's earlier owner is further down this walk than the successor. Lazy: taking the
    /// first few reads only the points up to them.
    pub fn walk(&self, key: u64) -> Walk<'_> {
        let start = if self.points.is_empty() { 0 } else { self.start(key) };
        Walk { ring: self, next: start, left: self.points.len(), seen: vec![false; self.names.len()], found: 0 }
    }

    /// Bytes the ring holds (its points and names), for the capacity model.
    pub fn heap_bytes(&self) -> usize {
        self.points.capacity() * std::mem::size_of::<(u64, u32)>()
            + self.names.iter().map(|name| name.capacity() + std::mem::size_of::<String>()).sum::<usize>()
    }
}

/// The distinct nodes from a key onwards (see [`Ring::walk`]).
pub struct Walk<'a> {
    ring: &'a Ring,
    next: usize,
    left: usize,
    seen: Vec<bool>,
    found: usize,
}

impl<'a> Iterator for Walk<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let ring = self.ring;
        while self.left > 0 && self.found < ring.names.len() {
            let (_, index) = ring.points[self.next];
            self.next = (self.next + 1) % ring.points.len();
            self.left -= 1;
            let seen = &mut self.seen[index as usize];
            if !*seen {
                *seen = true;
                self.found += 1;
                return Some(&ring.names[index as usize]);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use hashring::HashRing;

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

    /// The positions are those of the `hashring` crate the ring was built on before: a
    /// process of either version routes every key to the same node.
    #[test]
    fn owners_match_the_hashring_crate() {
        #[derive(Clone, Debug, PartialEq, Eq, Hash)]
        struct VirtualNode {
            node: String,
            replica: u32,
        }
        let nodes: Vec<String> = (0..40).map(|i| format!("worker-{i}")).collect();
        let mut crate_ring = HashRing::new();
        crate_ring.batch_add(
            nodes
                .iter()
                .flat_map(|node| (0..128).map(move |replica| VirtualNode { node: node.clone(), replica }))
                .collect(),
        );
        let ring = Ring::new(nodes.iter().map(String::as_str), 128);
        for key in 0..20_000u64 {
            let key = key.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            assert_eq!(ring.owner(key), crate_ring.get(&key).map(|vnode| vnode.node.as_str()), "key {key}");
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
            let walk: Vec<&str> = ring.walk(key).collect();
            assert_eq!(walk.len(), nodes.len());
            assert_eq!(walk[0], ring.owner(key).unwrap());
            assert_eq!(walk[1], ring.successor(key).unwrap());
            for gone in 1..nodes.len() {
                let rest: Vec<&str> = nodes.into_iter().filter(|n| !walk[..gone].contains(n)).collect();
                assert_eq!(Ring::new(rest, 64).owner(key), Some(walk[gone]), "key {key} without {:?}", &walk[..gone]);
            }
        }
        assert!(Ring::new([], 8).walk(1).next().is_none());
    }

    #[test]
    fn a_rebuilt_ring_equals_one_built_from_scratch() {
        let mut nodes: Vec<String> = (0..40).map(|i| format!("worker-{i}")).collect();
        let mut ring = Ring::new(nodes.iter().map(String::as_str), 32);
        for step in 0..30 {
            match step % 3 {
                0 => nodes.push(format!("joined-{step}")),
                1 => {
                    nodes.remove(step % nodes.len());
                }
                _ => {
                    nodes.remove(0);
                    nodes.push(format!("replaced-{step}"));
                }
            }
            ring = ring.rebuilt(nodes.iter().map(String::as_str));
            assert_eq!(ring, Ring::new(nodes.iter().map(String::as_str), 32), "after step {step}");
        }
        assert!(ring.rebuilt([]).is_empty());
        assert_eq!(Ring::new([], 32).rebuilt(["a", "b"]), Ring::new(["a", "b"], 32));
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
