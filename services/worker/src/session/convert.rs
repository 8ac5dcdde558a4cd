//! Conversions between session state and its wire form (`tether.worker.v1.SessionState`),
//! for replication, hand-off and pulls. A delta carries only what a response added to its
//! parent; a replica rebuilds the whole state from its copy of the parent.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tether_common::SessionKey;
use tether_common::tokens::PrefixHash;
use tether_proto::worker::v1 as pb;

use super::state::{ResponseState, Segments, Verdict};
use crate::api::items::{Item, Role};

impl From<&Item> for pb::Item {
    fn from(item: &Item) -> Self {
        let kind = match item {
            Item::Message { role, text } => {
                pb::item::Kind::Message(pb::Message { role: role.as_str().into(), text: text.clone() })
            }
            Item::FunctionCall { id, call_id, name, arguments } => pb::item::Kind::FunctionCall(pb::FunctionCall {
                id: id.clone(),
                call_id: call_id.clone(),
                name: name.clone(),
                arguments: arguments.clone(),
            }),
            Item::FunctionCallOutput { call_id, output } => {
                pb::item::Kind::FunctionCallOutput(pb::FunctionCallOutput {
                    call_id: call_id.clone(),
                    output: output.clone(),
                })
            }
        };
        pb::Item { kind: Some(kind) }
    }
}

impl TryFrom<pb::Item> for Item {
    type Error = ConvertError;

    fn try_from(item: pb::Item) -> Result<Self, ConvertError> {
        Ok(match item.kind.ok_or(ConvertError::Malformed("item without kind"))? {
            pb::item::Kind::Message(message) => {
                let role = Role::parse(&message.role).ok_or(ConvertError::Malformed("unknown role"))?;
                Item::Message { role, text: message.text }
            }
            pb::item::Kind::FunctionCall(call) => {
                Item::FunctionCall { id: call.id, call_id: call.call_id, name: call.name, arguments: call.arguments }
            }
            pb::item::Kind::FunctionCallOutput(output) => {
                Item::FunctionCallOutput { call_id: output.call_id, output: output.output }
            }
        })
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConvertError {
    #[error("malformed state: {0}")]
    Malformed(&'static str),
    /// A delta arrived for a parent this worker does not hold.
    #[error("parent of a delta is missing")]
    MissingParent,
}

/// Encodes `state`, as a delta on its parent when `delta` is set.
pub fn to_proto(state: &ResponseState, delta: bool) -> pb::SessionState {
    let delta = delta && state.parent.is_some();
    let (items, tokens, verdicts) = if delta {
        let tokens =
            if state.tokens_rebuilt { state.tokens.to_vec() } else { state.tokens.tail(state.own_tokens as usize) };
        (state.items.tail(state.own_items as usize), tokens, state.verdicts.tail(1))
    } else {
        (state.items.to_vec(), state.tokens.to_vec(), state.verdicts.to_vec())
    };
    pb::SessionState {
        id: state.id.clone(),
        tenant: state.tenant.to_string(),
        session: state.session.0,
        model: state.model.clone(),
        header_key: state.header_key,
        parent_id: state.parent.clone().unwrap_or_default(),
        delta,
        tokens_rebuilt: state.tokens_rebuilt,
        items: items.iter().map(pb::Item::from).collect(),
        tokens,
        verdicts: verdicts
            .iter()
            .map(|v| pb::Verdict { classifier: v.classifier.to_string(), items: v.items, bytes: v.bytes })
            .collect(),
        prefix_hash: state.prefix_hash.value(),
        open_assistant: state.open_assistant,
        tool_outputs_seen: state.tool_outputs_seen,
        response_json: state.response_json.to_vec(),
        age_ms: state.created.elapsed().as_millis() as u64,
    }
}

/// Decodes a replica; `parent` is the replica's copy of the parent (needed for a delta).
pub fn from_proto(state: pb::SessionState, parent: Option<&ResponseState>) -> Result<ResponseState, ConvertError> {
    let items: Vec<Item> = state.items.into_iter().map(Item::try_from).collect::<Result<_, _>>()?;
    let verdicts: Vec<Verdict> = state
        .verdicts
        .into_iter()
        .map(|v| Verdict { classifier: Arc::from(v.classifier.as_str()), items: v.items, bytes: v.bytes })
        .collect();
    let (own_items, own_tokens) = (items.len() as u32, state.tokens.len() as u32);
    // The hash check costs only the new tokens for a delta (the parent's hash extends).
    let (items, tokens, verdicts, hash) = if state.delta {
        let parent = parent.ok_or(ConvertError::MissingParent)?;
        let (tokens, hash) = if state.tokens_rebuilt {
            let hash = PrefixHash::of(&state.tokens);
            (Segments::default().with(state.tokens), hash)
        } else {
            let mut hash = parent.prefix_hash;
            hash.extend(&state.tokens);
            (parent.tokens.with(state.tokens), hash)
        };
        (parent.items.with(items), tokens, parent.verdicts.with(verdicts), hash)
    } else {
        let hash = PrefixHash::of(&state.tokens);
        (
            Segments::default().with(items),
            Segments::default().with(state.tokens),
            Segments::default().with(verdicts),
            hash,
        )
    };
    if hash.value() != state.prefix_hash {
        return Err(ConvertError::Malformed("token hash mismatch"));
    }
    let decoded = ResponseState {
        id: state.id,
        // A whole state stands alone: it is never re-sent as a delta on its parent.
        parent: (state.delta && !state.parent_id.is_empty()).then_some(state.parent_id),
        tenant: Arc::from(state.tenant.as_str()),
        session: SessionKey(state.session),
        store: true,
        connection: 0,
        model: state.model,
        header_key: state.header_key,
        items,
        tokens,
        own_items,
        own_tokens,
        tokens_rebuilt: state.tokens_rebuilt || !state.delta,
        prefix_hash: hash,
        open_assistant: state.open_assistant,
        tool_outputs_seen: state.tool_outputs_seen,
        verdicts,
        response_json: state.response_json.into(),
        created: Instant::now().checked_sub(Duration::from_millis(state.age_ms)).unwrap_or_else(Instant::now),
    };
    Ok(decoded)
}
