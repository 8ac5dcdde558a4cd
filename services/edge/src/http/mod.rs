//! The HTTP surface of the Responses API.

pub mod cluster;
pub mod input_items;
pub mod input_tokens;
pub mod models;
pub mod replay;
pub mod responses;
pub mod unread_body;
pub mod unsupported;
