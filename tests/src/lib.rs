//! The in-process cluster harness: every node runs the real `serve()` on its own thread and
//! runtime, on a listener pre-bound to 127.0.0.1:0, with in-memory membership. `kill()` drops
//! a node's runtime (sockets close abruptly, nothing deregisters): a real crash.

pub mod agents;
pub mod browser;
pub mod client;
pub mod cluster;
pub mod etcd;
pub mod process;
pub mod scale;
pub mod scrape;
pub mod wait;

pub use cluster::{Cluster, ClusterBuilder, Node};
