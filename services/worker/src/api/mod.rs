//! The Responses API as the worker sees it: the typed create request, conversation items,
//! the Response object and the serialized events.

pub mod events;
pub mod item_list;
pub mod items;
pub mod request;
pub mod response;
