//! The HTTP surface of the Responses API.

pub mod models;
pub mod replay;
pub mod responses;
pub mod unsupported;
