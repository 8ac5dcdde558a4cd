//! Splicing a response continued on another worker onto what its client already has.
//!
//! A worker that continues a response (see `Resume` in the worker protocol) replays it from
//! `response.created`: the same items, ids and text, because it feeds the output so far
//! through the same output builder before the shard continues the generation. Event
//! boundaries may differ (deltas coalesce differently), so the two streams are matched by
//! content, not by event: the count of non-delta events, and within the delta run after the
//! last of them, the bytes of delta text. The splice drops what the client has, trims the
//! delta that straddles the point it reached, and renumbers `sequence_number` so the client
//! sees one response with strictly increasing numbers.

use serde_json::Value;

/// What the client has been sent of one response, in the units a continuation is matched in,
/// and the completion tokens behind it.
#[derive(Debug, Default)]
pub struct Ledger {
    /// Events relayed: the next event's `sequence_number`.
    pub sent: u64,
    /// Relayed events that are not deltas.
    structural: u64,
    /// Delta bytes relayed since the last non-delta event.
    delta: usize,
    /// The completion tokens the workers reported with the relayed events, and their text.
    pub ids: Vec<u32>,
    pub text: String,
}

impl Ledger {
    /// Notes completion tokens a worker reported with an event.
    pub fn progress(&mut self, ids: &[u32], text: &str) {
        self.ids.extend_from_slice(ids);
        self.text.push_str(text);
    }

    /// Counts an event sent to the client; `delta_bytes` is the length of a delta's text.
    pub fn relayed(&mut self, event_type: &str, delta_bytes: usize) {
        self.sent += 1;
        if is_delta(event_type) {
            self.delta += delta_bytes;
        } else {
            self.structural += 1;
            self.delta = 0;
        }
    }
}

fn is_delta(event_type: &str) -> bool {
    event_type.ends_with(".delta")
}

/// The splice could not line the continuation up with what the client has: the continuation
/// is not the same response (an engine that does not continue deterministically).
#[derive(Debug, thiserror::Error)]
#[error("the continued response does not line up with the relayed one: {0}")]
pub struct Misaligned(&'static str);

/// One continuation's event, after the splice.
#[derive(Debug, PartialEq)]
pub enum Spliced {
    /// The client already has it.
    Drop,
    /// Send it: the event (renumbered, a straddling delta trimmed) and its delta bytes.
    Forward { json: Vec<u8>, delta_bytes: usize },
}

/// Matches one continuation stream against the [`Ledger`] of what was relayed.
#[derive(Debug, Default)]
pub struct Splice {
    /// Non-delta events of the continuation seen so far.
    structural: u64,
    /// Delta bytes of the continuation since its last non-delta event.
    delta: usize,
}

impl Splice {
    /// Decides what to do with the continuation's next event.
    pub fn apply(
        &mut self,
        ledger: &Ledger,
        event_type: &str,
        json: Vec<u8>,
        delta_bytes: usize,
        terminal: bool,
    ) -> Result<Spliced, Misaligned> {
        if terminal {
            // The end is always the client's, whatever it had.
            return renumber(json, ledger.sent, None).map(|json| Spliced::Forward { json, delta_bytes: 0 });
        }
        if !is_delta(event_type) {
            self.structural += 1;
            self.delta = 0;
            if self.structural <= ledger.structural {
                return Ok(Spliced::Drop);
            }
            return renumber(json, ledger.sent, None).map(|json| Spliced::Forward { json, delta_bytes: 0 });
        }
        let before = self.delta;
        self.delta += delta_bytes;
        if self.structural < ledger.structural {
            // A delta run the client saw close.
            return Ok(Spliced::Drop);
        }
        if self.structural > ledger.structural || before >= ledger.delta {
            return renumber(json, ledger.sent, None).map(|json| Spliced::Forward { json, delta_bytes });
        }
        if self.delta <= ledger.delta {
            return Ok(Spliced::Drop);
        }
        // The client has the first `ledger.delta - before` bytes of this delta.
        let skip = ledger.delta - before;
        renumber(json, ledger.sent, Some(skip)).map(|json| Spliced::Forward { json, delta_bytes: delta_bytes - skip })
    }
}

/// Sets the event's `sequence_number`, and drops the first `skip` bytes of its `delta`.
fn renumber(json: Vec<u8>, sequence: u64, skip: Option<usize>) -> Result<Vec<u8>, Misaligned> {
    let mut event: Value = serde_json::from_slice(&json).map_err(|_| Misaligned("an event is not JSON"))?;
    let object = event.as_object_mut().ok_or(Misaligned("an event is not an object"))?;
    object.insert("sequence_number".into(), Value::from(sequence));
    if let Some(skip) = skip {
        let delta = object.get("delta").and_then(Value::as_str).ok_or(Misaligned("a delta has no text"))?;
        let rest = delta.get(skip..).ok_or(Misaligned("a delta splits a character"))?.to_owned();
        object.insert("delta".into(), Value::String(rest));
    }
    Ok(serde_json::to_vec(&event).expect("events serialize"))
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::{Ledger, Splice, Spliced};

    /// A stream of (type, delta text) as a worker would send it.
    fn stream(events: &[(&str, &str)]) -> Vec<(String, Vec<u8>, usize)> {
        events
            .iter()
            .enumerate()
            .map(|(sequence, (kind, delta))| {
                let mut event = json!({"type": kind, "sequence_number": sequence});
                if kind.ends_with(".delta") {
                    event["delta"] = json!(delta);
                }
                (kind.to_string(), serde_json::to_vec(&event).unwrap(), delta.len())
            })
            .collect()
    }

    /// Relays `first[..cut]`, then splices `second`; returns what the client saw.
    fn splice(first: &[(&str, &str)], cut: usize, second: &[(&str, &str)]) -> Vec<Value> {
        let mut ledger = Ledger::default();
        let mut client = Vec::new();
        for (kind, json, delta) in stream(first).into_iter().take(cut) {
            ledger.relayed(&kind, delta);
            client.push(serde_json::from_slice(&json).unwrap());
        }
        let mut splice = Splice::default();
        let events = stream(second);
        let last = events.len() - 1;
        for (i, (kind, json, delta)) in events.into_iter().enumerate() {
            match splice.apply(&ledger, &kind, json, delta, i == last).unwrap() {
                Spliced::Drop => {}
                Spliced::Forward { json, delta_bytes } => {
                    ledger.relayed(&kind, delta_bytes);
                    client.push(serde_json::from_slice(&json).unwrap());
                }
            }
        }
        client
    }

    fn text(events: &[Value]) -> String {
        events.iter().filter_map(|e| e["delta"].as_str()).collect()
    }

    const CREATED: (&str, &str) = ("response.created", "");
    const ADDED: (&str, &str) = ("response.output_item.added", "");
    const DONE: (&str, &str) = ("response.output_item.done", "");
    const COMPLETED: (&str, &str) = ("response.completed", "");

    fn delta(text: &str) -> (&'static str, &str) {
        ("response.output_text.delta", text)
    }

    #[test]
    fn the_client_sees_one_stream_at_every_cut_and_every_coalescing() {
        let first = [
            CREATED,
            ADDED,
            delta("The"),
            delta(" cache"),
            delta(" é"),
            delta(" ring"),
            DONE,
            ADDED,
            delta("x"),
            DONE,
            COMPLETED,
        ];
        // The continuation coalesced differently.
        let second =
            [CREATED, ADDED, delta("The cache é"), delta(" ri"), delta("ng"), DONE, ADDED, delta("x"), DONE, COMPLETED];
        for cut in 1..first.len() {
            let client = splice(&first, cut, &second);
            let numbers: Vec<u64> = client.iter().map(|e| e["sequence_number"].as_u64().unwrap()).collect();
            assert_eq!(numbers, (0..client.len() as u64).collect::<Vec<_>>(), "cut {cut}: strictly increasing");
            assert_eq!(text(&client), "The cache é ringx", "cut {cut}: no delta lost or repeated");
            let kinds: Vec<&str> =
                client.iter().map(|e| e["type"].as_str().unwrap()).filter(|k| !k.ends_with(".delta")).collect();
            assert_eq!(
                kinds,
                [
                    "response.created",
                    "response.output_item.added",
                    "response.output_item.done",
                    "response.output_item.added",
                    "response.output_item.done",
                    "response.completed"
                ],
                "cut {cut}"
            );
        }
    }

    #[test]
    fn a_cut_inside_a_multibyte_character_is_misaligned() {
        let mut ledger = Ledger::default();
        for (kind, _, delta) in stream(&[CREATED, ADDED, delta("a")]) {
            ledger.relayed(&kind, delta);
        }
        let mut splice = Splice::default();
        for (kind, json, delta) in stream(&[CREATED, ADDED]) {
            assert_eq!(splice.apply(&ledger, &kind, json, delta, false).unwrap(), Spliced::Drop);
        }
        let (kind, json, bytes) = stream(&[delta("éa")]).remove(0);
        // "a" (1 byte) relayed, but the continuation's text starts with a 2-byte character.
        assert!(splice.apply(&ledger, &kind, json, bytes, false).is_err());
    }
}
