//! tether's inference shard: an engine behind the `tether.shard.v1.Shard` gRPC service, with
//! a per-session KV cache so a follow-up turn prefills only its new tokens, and (for an engine
//! that can share them) a content-addressed index of held prefixes across sessions.

pub mod config;
pub mod engine;
pub mod error;
pub mod grpc;
pub mod kv_cache;
pub mod metrics;
pub mod migration;
pub mod peers;
pub mod prefix_index;
mod server;

pub use config::{ShardArgs, ShardConfig};
pub use error::ShardError;
pub use server::serve;
