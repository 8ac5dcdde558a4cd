//! Pieces every tether service shares: identifiers, the error classification, discovery,
//! placement, the tokenizer, telemetry, shutdown and the HTTP serving helper.

pub mod config;
pub mod discovery;
pub mod error_code;
pub mod ids;
pub mod limits;
pub mod link;
pub mod nodes;
pub mod ops;
pub mod pause;
pub mod placement;
pub mod serve;
pub mod shutdown;
pub mod telemetry;
pub mod tls;
pub mod tokenizer;
pub mod tokens;
pub mod trace;

pub use error_code::ErrorClass;
pub use ids::{ResponseId, SessionKey};
