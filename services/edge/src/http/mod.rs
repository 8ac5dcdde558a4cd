//! The HTTP surface of the Responses API.

pub mod models;
pub mod responses;
