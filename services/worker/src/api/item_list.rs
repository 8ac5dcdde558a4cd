//! A stored response's input items as `GET /v1/responses/{id}/input_items` lists them: every
//! item of the context that generated the response (the earlier turns' inputs and outputs,
//! then this response's own input), in the API's item shapes, one page at a time.
//!
//! Items are stored without ids (a function call keeps its own). Each other item gets an id
//! derived from its chain's session key, its position and its content, so the same item has
//! the same id in every listing, from any response of the chain and on any worker that holds
//! it, and `after` pages stay stable.

use std::collections::HashSet;

use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::{Value, json};
use tether_common::tokens::Fnv64;

use super::items::{Item, Role};
use crate::error::WorkerError;
use crate::session::ResponseState;

/// Which page to list.
#[derive(Clone, Debug)]
pub struct Page {
    /// Items per page (1 to 100).
    pub limit: usize,
    /// Oldest first; newest first otherwise (the API's default).
    pub ascending: bool,
    /// List the items after this id.
    pub after: Option<String>,
}

/// The page of `state`'s input items `page` asks for, as a `ResponseItemList` object.
pub fn list(state: &ResponseState, page: &Page) -> Result<Value, WorkerError> {
    let count = input_count(state);
    let items: Vec<&Item> = state.items.iter().take(count).collect();
    let ids = item_ids(state.session.0, &items);
    let mut order: Vec<usize> = (0..items.len()).collect();
    if !page.ascending {
        order.reverse();
    }
    let start = match &page.after {
        None => 0,
        Some(after) => match order.iter().position(|&index| ids[index] == *after) {
            Some(position) => position + 1,
            None => {
                return Err(WorkerError::invalid(
                    "after",
                    format!("No item with id '{after}' is among this response's input items."),
                ));
            }
        },
    };
    let end = start.saturating_add(page.limit.max(1)).min(order.len());
    let data: Vec<Value> = order[start..end].iter().map(|&index| item_json(items[index], &ids[index])).collect();
    let id_at = |position: Option<&usize>| position.map_or(Value::Null, |&index| Value::String(ids[index].clone()));
    Ok(json!({
        "object": "list",
        "data": data,
        "first_id": id_at(order[start..end].first()),
        "last_id": id_at(order[start..end].last()),
        "has_more": end < order.len(),
    }))
}

/// How many of `state`'s items were its input: all but its own output items (the last ones,
/// one per item of the Response's `output`).
fn input_count(state: &ResponseState) -> usize {
    #[derive(Deserialize)]
    struct Output {
        #[serde(default)]
        output: Vec<IgnoredAny>,
    }
    let outputs = serde_json::from_slice::<Output>(&state.response_json).map_or(0, |response| response.output.len());
    state.items.len().saturating_sub(outputs)
}

/// Each item's id: a function call's own (unless an earlier item already has it), otherwise
/// one derived from the chain's key, the position and the content.
fn item_ids(session: u64, items: &[&Item]) -> Vec<String> {
    let mut seen = HashSet::with_capacity(items.len());
    items
        .iter()
        .enumerate()
        .map(|(index, item)| {
            let own = match item {
                Item::FunctionCall { id, .. } if !id.is_empty() && !seen.contains(id.as_str()) => Some(id.clone()),
                _ => None,
            };
            let id = own.unwrap_or_else(|| derived_id(session, index, item));
            seen.insert(id.clone());
            id
        })
        .collect()
}

fn derived_id(session: u64, index: usize, item: &Item) -> String {
    let mut hash = Fnv64::new();
    hash.write(&session.to_le_bytes());
    hash.write(&(index as u64).to_le_bytes());
    let prefix = match item {
        Item::Message { role, text } => {
            hash.write(role.as_str().as_bytes());
            hash.write(&[0xff]);
            hash.write(text.as_bytes());
            "msg"
        }
        Item::FunctionCall { call_id, name, arguments, .. } => {
            for part in [call_id, name, arguments] {
                hash.write(part.as_bytes());
                hash.write(&[0xff]);
            }
            "fc"
        }
        Item::FunctionCallOutput { call_id, output } => {
            hash.write(call_id.as_bytes());
            hash.write(&[0xff]);
            hash.write(output.as_bytes());
            "fco"
        }
    };
    format!("{prefix}_{:016x}{:08x}", hash.finish(), index as u32)
}

/// One item in the API's shape (`ResponseInputMessageItem`, `ResponseOutputMessage`,
/// `ResponseFunctionToolCallItem`, `ResponseFunctionToolCallOutputItem`).
fn item_json(item: &Item, id: &str) -> Value {
    match item {
        Item::Message { role: Role::Assistant, text } => json!({
            "id": id, "type": "message", "role": "assistant", "status": "completed",
            "content": [{"type": "output_text", "text": text, "annotations": []}],
        }),
        Item::Message { role, text } => json!({
            "id": id, "type": "message", "role": role.as_str(), "status": "completed",
            "content": [{"type": "input_text", "text": text}],
        }),
        Item::FunctionCall { call_id, name, arguments, .. } => json!({
            "id": id, "type": "function_call", "status": "completed",
            "call_id": call_id, "name": name, "arguments": arguments,
        }),
        Item::FunctionCallOutput { call_id, output } => json!({
            "id": id, "type": "function_call_output", "status": "completed", "call_id": call_id, "output": output,
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Instant;

    use serde_json::{Value, json};
    use tether_common::SessionKey;
    use tether_common::tokens::PrefixHash;

    use super::{Page, list};
    use crate::api::items::{Item, Role};
    use crate::session::{ResponseState, Segments};

    fn state(items: Vec<Item>, output: usize) -> ResponseState {
        let response = json!({"output": vec![json!({}); output]});
        ResponseState {
            id: "resp_x".into(),
            parent: None,
            tenant: Arc::from("default"),
            session: SessionKey(7),
            store: true,
            connection: 0,
            model: "tether-sim".into(),
            header_key: 0,
            own_items: items.len() as u32,
            items: Segments::default().with(items),
            tokens: Segments::default(),
            own_tokens: 0,
            tokens_rebuilt: true,
            prefix_hash: PrefixHash::default(),
            open_assistant: true,
            tool_outputs_seen: 0,
            verdicts: Segments::default(),
            response_json: serde_json::to_vec(&response).unwrap().into(),
            created: Instant::now(),
        }
    }

    fn chain() -> ResponseState {
        let message = |role, text: &str| Item::Message { role, text: text.into() };
        state(
            vec![
                message(Role::User, "one"),
                Item::FunctionCall {
                    id: "fc_1".into(),
                    call_id: "c1".into(),
                    name: "f".into(),
                    arguments: "{}".into(),
                },
                Item::FunctionCallOutput { call_id: "c1".into(), output: "42".into() },
                message(Role::Assistant, "two"),
                message(Role::User, "three"),
                // This response's own output: not an input item.
                message(Role::Assistant, "four"),
            ],
            1,
        )
    }

    fn page(limit: usize, ascending: bool, after: Option<&str>) -> Page {
        Page { limit, ascending, after: after.map(str::to_owned) }
    }

    fn ids(list: &Value) -> Vec<String> {
        list["data"].as_array().unwrap().iter().map(|item| item["id"].as_str().unwrap().to_owned()).collect()
    }

    #[test]
    fn lists_the_context_newest_first_without_the_own_output() {
        let state = chain();
        let all = list(&state, &page(20, false, None)).unwrap();
        let texts: Vec<&Value> = all["data"].as_array().unwrap().iter().collect();
        assert_eq!(texts.len(), 5);
        assert_eq!(texts[0]["content"][0], json!({"type": "input_text", "text": "three"}));
        assert_eq!(texts[1]["content"][0]["type"], "output_text");
        assert_eq!(texts[2]["type"], "function_call_output");
        assert_eq!(texts[3]["id"], "fc_1", "a function call keeps its id");
        assert_eq!(all["has_more"], false);
        assert_eq!(all["first_id"], texts[0]["id"]);
        assert_eq!(all["last_id"], texts[4]["id"]);
    }

    #[test]
    fn pages_follow_after_and_ids_are_stable() {
        let state = chain();
        let whole = ids(&list(&state, &page(100, true, None)).unwrap());
        assert_eq!(whole.iter().collect::<std::collections::HashSet<_>>().len(), 5, "ids are unique: {whole:?}");
        let mut walked = Vec::new();
        let mut after = None;
        loop {
            let page = list(&state, &page(2, true, after.as_deref())).unwrap();
            walked.extend(ids(&page));
            if page["has_more"] == false {
                break;
            }
            after = page["last_id"].as_str().map(str::to_owned);
        }
        assert_eq!(walked, whole);
        assert_eq!(ids(&list(&chain(), &page(100, true, None)).unwrap()), whole, "the same ids every time");
        let error = list(&state, &page(2, true, Some("msg_nope"))).unwrap_err();
        assert_eq!(error.api_error().param, "after");
    }

    #[test]
    fn the_same_item_of_another_chain_has_another_id() {
        let mut other = chain();
        other.session = SessionKey(8);
        let ours = ids(&list(&chain(), &page(100, true, None)).unwrap());
        let theirs = ids(&list(&other, &page(100, true, None)).unwrap());
        assert_ne!(ours[0], theirs[0]);
        assert_eq!(ours[1], theirs[1], "a function call keeps its own id");
    }
}
