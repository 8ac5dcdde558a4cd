//! tether's edge: the OpenAI Responses API over HTTP (JSON and SSE) and WebSocket mode.
//! It authenticates, checks each event's envelope, places sessions on workers by consistent
//! hashing, and relays the worker's already serialized events frame by frame.

mod accept;
pub mod admission;
pub mod app;
pub mod auth;
pub mod config;
pub mod envelope;
pub mod error;
pub mod http;
pub mod leading;
pub mod metrics;
pub mod relay;
mod server;
pub mod state;
pub mod stats;
pub mod status;
mod trace;
pub mod workers;
pub mod ws;

pub use config::{EdgeArgs, EdgeConfig};
pub use error::EdgeError;
pub use server::serve;
