//! tether's worker: owns sessions, runs the per-turn pipeline, calls shards directly and
//! streams serialized Responses API events back to the edge.

pub mod api;
pub mod budget;
pub mod config;
pub mod context;
pub mod error;
pub mod grpc;
pub mod in_flight;
pub mod metrics;
pub mod peers;
pub mod pipeline;
pub mod render;
pub mod replication;
pub mod safety;
mod server;
pub mod session;
pub mod shard_pool;
pub mod stats;
pub mod tokenizer;

pub use config::{WorkerArgs, WorkerConfig};
pub use error::WorkerError;
pub use server::serve;
