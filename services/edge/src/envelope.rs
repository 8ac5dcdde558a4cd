//! The envelope of a client event or create body: the few fields the edge needs to route
//! and to reject bad input early. The rest of the body is validated by the worker.

use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;
use tether_common::ResponseId;
use tether_proto::worker::v1::ApiError;

use crate::error::{invalid, previous_not_found};
use crate::leading::{FirstInput, LeadingHash};

#[derive(Debug, Default, Deserialize)]
struct RawEnvelope<'a> {
    #[serde(rename = "type")]
    kind: Option<Value>,
    stream: Option<Value>,
    stream_id: Option<Value>,
    previous_response_id: Option<Value>,
    prompt_cache_key: Option<Value>,
    store: Option<Value>,
    /// Kept as sent, read only for a request placed by its content.
    #[serde(borrow)]
    instructions: Option<&'a RawValue>,
    #[serde(borrow, default)]
    input: FirstInput<'a>,
    // Every other field is skipped as it is read (serde's derive ignores unknown fields): no
    // `#[serde(flatten)]` catch-all, which would first copy the whole body into a buffer.
}

/// What the edge knows about a request before it reaches a worker.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Envelope {
    pub kind: Option<String>,
    pub stream: bool,
    /// The lane (`None` for the default lane).
    pub stream_id: Option<String>,
    pub previous: Option<ResponseId>,
    pub prompt_cache_key: Option<String>,
    /// The hash of the body's instructions and first input item, for a stateless request
    /// (`store: false`): without `previous_response_id` or a key, it is placed by it.
    pub leading: Option<LeadingHash>,
}

/// Why an envelope was rejected, and which lane (if known) the error belongs to.
#[derive(Debug)]
pub struct Rejection {
    pub error: ApiError,
    pub stream_id: Option<String>,
}

impl Envelope {
    /// Parses and checks an envelope. Non-JSON and non-object input is `invalid_json`.
    #[allow(clippy::result_large_err, reason = "a rejection is answered at once, never propagated further")]
    pub fn parse(bytes: &[u8]) -> Result<Self, Rejection> {
        let reject = |error: ApiError, stream_id: Option<String>| Rejection { error, stream_id };
        let raw: RawEnvelope<'_> = match serde_json::from_slice(bytes) {
            Ok(raw) => raw,
            Err(error) if error.is_data() => {
                return Err(reject(invalid("invalid_json", "The message must be a JSON object.", ""), None));
            }
            Err(_) => return Err(reject(invalid("invalid_json", "The message is not valid JSON.", ""), None)),
        };
        let kind = match raw.kind {
            None | Some(Value::Null) => None,
            Some(Value::String(kind)) => Some(kind),
            Some(_) => {
                return Err(reject(invalid("invalid_event_type", "The 'type' field must be a string.", "type"), None));
            }
        };
        let stream_id = match raw.stream_id {
            None | Some(Value::Null) => None,
            Some(Value::String(id)) if valid_stream_id(&id) => Some(id),
            Some(_) => {
                return Err(reject(
                    invalid(
                        "invalid_stream_id",
                        "The 'stream_id' field must be a non-empty string with at most 256 characters and may only contain letters, numbers, underscores, hyphens, and periods.",
                        "stream_id",
                    ),
                    None,
                ));
            }
        };
        let previous = match raw.previous_response_id {
            None | Some(Value::Null) => None,
            Some(Value::String(id)) => match ResponseId::parse(&id) {
                Some(id) => Some(id),
                // An id tether never minted names no response anywhere.
                None => return Err(reject(previous_not_found(&id), stream_id)),
            },
            Some(_) => {
                return Err(reject(
                    invalid(
                        "invalid_request",
                        "'previous_response_id' must be a string or null.",
                        "previous_response_id",
                    ),
                    stream_id,
                ));
            }
        };
        let stream = match raw.stream {
            None | Some(Value::Null) => false,
            Some(Value::Bool(stream)) => stream,
            Some(_) => {
                return Err(reject(
                    invalid("invalid_type", "Invalid type for 'stream': expected a boolean.", "stream"),
                    stream_id,
                ));
            }
        };
        let prompt_cache_key = match raw.prompt_cache_key {
            Some(Value::String(key)) if !key.is_empty() => Some(key),
            _ => None,
        };
        // Only a request that is not stored is placed by its content: it can only be continued
        // by resending its history. A stored one starts a chain continued by its id, and placing
        // it by content would put every conversation that opens alike (the same greeting from
        // thousands of clients) on one worker.
        let leading = match raw.store {
            Some(Value::Bool(false)) => LeadingHash::of(raw.instructions, &raw.input),
            _ => None,
        };
        Ok(Envelope { kind, stream, stream_id, previous, prompt_cache_key, leading })
    }
}

/// `^[A-Za-z0-9_.-]{1,256}$`
pub fn valid_stream_id(id: &str) -> bool {
    (1..=256).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

#[cfg(test)]
mod tests {
    use tether_common::{ResponseId, SessionKey};

    use super::{Envelope, valid_stream_id};

    #[test]
    fn parses_routing_fields() {
        let id = ResponseId::new(SessionKey(42));
        let body = format!(
            r#"{{"type":"response.create","stream":true,"stream_id":"main","previous_response_id":"{id}","input":[1,2]}}"#
        );
        let envelope = Envelope::parse(body.as_bytes()).unwrap();
        assert_eq!(envelope.kind.as_deref(), Some("response.create"));
        assert!(envelope.stream);
        assert_eq!(envelope.stream_id.as_deref(), Some("main"));
        assert_eq!(envelope.previous.unwrap().session_key(), SessionKey(42));
        assert_eq!(envelope.leading, None, "a stored request is not placed by its content");
        let stateless = Envelope::parse(br#"{"store":false,"input":"hi"}"#).unwrap();
        assert!(stateless.leading.is_some(), "the first input item is leading content");
        assert_eq!(Envelope::parse(br#"{"store":false}"#).unwrap().leading, None);
    }

    #[test]
    fn rejects_bad_envelopes_with_codes() {
        for (body, code) in [
            ("not json", "invalid_json"),
            ("[1]", "invalid_json"),
            (r#"{"type":5}"#, "invalid_event_type"),
            (r#"{"stream_id":""}"#, "invalid_stream_id"),
            (r#"{"stream_id":"a b"}"#, "invalid_stream_id"),
            (r#"{"stream_id":7}"#, "invalid_stream_id"),
            (r#"{"previous_response_id":"resp_nope"}"#, "previous_response_not_found"),
        ] {
            assert_eq!(Envelope::parse(body.as_bytes()).unwrap_err().error.code, code, "{body}");
        }
        for body in [r#"{"stream":"yes"}"#, r#"{"stream":1}"#, r#"{"stream":[]}"#] {
            let error = Envelope::parse(body.as_bytes()).unwrap_err().error;
            assert_eq!((error.status, error.r#type.as_str()), (400, "invalid_request_error"), "{body}");
            assert_eq!(error.param, "stream", "{body}");
        }
        assert!(!Envelope::parse(br#"{"stream":null}"#).unwrap().stream);
        assert!(!Envelope::parse(br#"{"stream":false}"#).unwrap().stream);
        let lane = Envelope::parse(br#"{"stream_id":"x","previous_response_id":"resp_bad"}"#).unwrap_err();
        assert_eq!(lane.stream_id.as_deref(), Some("x"));
        assert!(valid_stream_id(&"a".repeat(256)) && !valid_stream_id(&"a".repeat(257)));
    }
}
