//! The leading content of a create body (its `instructions` and first `input` item), hashed:
//! where a stateless request (`store: false`) with neither `previous_response_id` nor a client
//! key is placed, so a conversation whose client resends the whole history lands turn after
//! turn on the worker and shard that hold its prefix (the shard's content-addressed cache).
//!
//! Only the first input item is read; the rest of the history is skipped, not built. A message
//! is reduced to its role and its text, so the shapes a client may send the same message in (a
//! string `input`, `content` as a string or as text parts) hash alike.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use serde_json::value::RawValue;
use tether_common::tokens::Fnv64;

/// The hash of a request's leading content.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeadingHash(pub u64);

impl LeadingHash {
    /// Returns the hash of `instructions` and the first input item; `None` when the body has
    /// neither (nothing to place by).
    pub(crate) fn of(instructions: Option<&RawValue>, first: &FirstInput<'_>) -> Option<Self> {
        // Read into values only here: a stored request never needs them.
        let instructions = match instructions.map(|raw| serde_json::from_str::<Value>(raw.get())) {
            None | Some(Ok(Value::Null)) | Some(Err(_)) => None,
            Some(Ok(value)) => Some(value),
        };
        if instructions.is_none() && matches!(first, FirstInput::Nothing) {
            return None;
        }
        let mut hash = Fnv64::new();
        match &instructions {
            Some(Value::String(text)) => write_field(&mut hash, text),
            Some(other) => write_field(&mut hash, &other.to_string()),
            None => write_field(&mut hash, ""),
        }
        match first {
            FirstInput::Text(text) => {
                write_field(&mut hash, "user");
                write_field(&mut hash, text);
            }
            FirstInput::Item(raw) => match serde_json::from_str::<Value>(raw.get()) {
                Ok(Value::Object(item)) if item.get("role").is_some_and(Value::is_string) => {
                    let role = item.get("role").and_then(Value::as_str).unwrap_or_default();
                    write_message(&mut hash, role, item.get("content"));
                }
                Ok(other) => write_field(&mut hash, &other.to_string()),
                Err(_) => write_field(&mut hash, raw.get()),
            },
            FirstInput::Nothing => write_field(&mut hash, ""),
        }
        Some(LeadingHash(hash.finish()))
    }
}

/// Length-prefixed, so that field boundaries cannot shift.
fn write_field(hash: &mut Fnv64, text: &str) {
    hash.write(&(text.len() as u64).to_le_bytes());
    hash.write(text.as_bytes());
}

fn write_message(hash: &mut Fnv64, role: &str, content: Option<&Value>) {
    write_field(hash, role);
    match content {
        Some(Value::String(text)) => write_field(hash, text),
        Some(Value::Array(parts)) => {
            for part in parts {
                match part.get("text") {
                    Some(Value::String(text)) => write_field(hash, text),
                    _ => write_field(hash, &part.to_string()),
                }
            }
        }
        Some(other) => write_field(hash, &other.to_string()),
        None => write_field(hash, ""),
    }
}

/// The first item of `input`, as the envelope reads it: any JSON is accepted here (the worker
/// validates the body), and nothing is built: the first element of an array is kept as the
/// bytes it was sent as, read only if the request is placed by it.
#[derive(Debug, Default)]
pub(crate) enum FirstInput<'a> {
    /// A string `input`: one user message.
    Text(Cow<'a, str>),
    Item(&'a RawValue),
    /// No input, an empty array, or a value that is no input at all (the worker rejects it).
    #[default]
    Nothing,
}

impl<'de: 'a, 'a> Deserialize<'de> for FirstInput<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(FirstInputVisitor(std::marker::PhantomData))
    }
}

struct FirstInputVisitor<'a>(std::marker::PhantomData<&'a ()>);

impl<'de: 'a, 'a> Visitor<'de> for FirstInputVisitor<'a> {
    type Value = FirstInput<'a>;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("any JSON value")
    }

    fn visit_borrowed_str<E: de::Error>(self, text: &'de str) -> Result<FirstInput<'a>, E> {
        Ok(FirstInput::Text(Cow::Borrowed(text)))
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<FirstInput<'a>, E> {
        Ok(FirstInput::Text(Cow::Owned(text.to_owned())))
    }

    fn visit_string<E: de::Error>(self, text: String) -> Result<FirstInput<'a>, E> {
        Ok(FirstInput::Text(Cow::Owned(text)))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<FirstInput<'a>, A::Error> {
        let first = seq.next_element::<&'a RawValue>()?;
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(first.map_or(FirstInput::Nothing, FirstInput::Item))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<FirstInput<'a>, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(FirstInput::Nothing)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<FirstInput<'a>, E> {
        Ok(FirstInput::Nothing)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<FirstInput<'a>, E> {
        Ok(FirstInput::Nothing)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<FirstInput<'a>, E> {
        Ok(FirstInput::Nothing)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<FirstInput<'a>, E> {
        Ok(FirstInput::Nothing)
    }

    fn visit_unit<E: de::Error>(self) -> Result<FirstInput<'a>, E> {
        Ok(FirstInput::Nothing)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::{FirstInput, LeadingHash};

    fn leading(body: Value) -> Option<LeadingHash> {
        #[derive(serde::Deserialize)]
        struct Body<'a> {
            #[serde(borrow)]
            instructions: Option<&'a serde_json::value::RawValue>,
            #[serde(borrow, default)]
            input: FirstInput<'a>,
        }
        let text = body.to_string();
        let body: Body<'_> = serde_json::from_str(&text).expect("body");
        LeadingHash::of(body.instructions, &body.input)
    }

    #[test]
    fn the_same_first_message_in_any_shape_hashes_alike_and_the_rest_is_ignored() {
        let text = "fix the tests";
        let shapes = [
            json!({"input": text}),
            json!({"input": [{"role": "user", "content": text}]}),
            json!({"input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}]}),
            json!({"input": [
                {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]},
                {"type": "function_call", "call_id": "c1", "name": "run_tests", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "ok"},
            ]}),
        ];
        let first = leading(shapes[0].clone()).expect("a leading hash");
        for shape in &shapes[1..] {
            assert_eq!(leading(shape.clone()), Some(first), "{shape}");
        }
    }

    #[test]
    fn instructions_role_and_text_tell_prefixes_apart() {
        let base = leading(json!({"instructions": "be brief", "input": "hello"}));
        assert!(base.is_some());
        for other in [
            json!({"input": "hello"}),
            json!({"instructions": "be long", "input": "hello"}),
            json!({"instructions": "be brief", "input": "hello!"}),
            json!({"instructions": "be brief", "input": [{"role": "developer", "content": "hello"}]}),
            // Field boundaries do not shift: "be brie" + "fhello" is not "be brief" + "hello".
            json!({"instructions": "be brie", "input": "fhello"}),
        ] {
            assert_ne!(leading(other.clone()), base, "{other}");
        }
        assert_eq!(
            leading(json!({"instructions": "be brief"})),
            leading(json!({"instructions": "be brief", "input": []}))
        );
    }

    #[test]
    fn a_body_with_nothing_to_place_by_has_no_hash_and_odd_input_is_left_to_the_worker() {
        assert_eq!(leading(json!({})), None);
        assert_eq!(leading(json!({"input": []})), None);
        assert_eq!(leading(json!({"input": 5})), None);
        assert_eq!(leading(json!({"input": {"a": [1]}, "instructions": null})), None);
    }
}
