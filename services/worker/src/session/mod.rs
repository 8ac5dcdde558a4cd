//! Session state: what a worker keeps per response so a follow-up costs only its new work.

pub mod cache;
pub mod convert;
pub mod held;
pub mod state;

pub use cache::{CacheLimits, SessionCache};
pub use held::HeldPrompts;
pub use state::{ResponseState, Segments};
