//! An incremental parser for one `<tool_call>` span, so a call's arguments stream as the
//! model writes them.
//!
//! The parser receives the text after `<tool_call>`. Once `{"name": "<name>", "arguments":`
//! and the first character of the arguments (`{` or `"`) have arrived, the call opens; its
//! arguments then pass on as they arrive: an object's JSON text with the whitespace between
//! tokens dropped (what `serde_json` writes, so a complete call stores the same arguments as
//! when it was parsed whole), or a string's decoded content. A body of another shape (keys in
//! another order, arguments neither an object nor a string) is buffered until `</tool_call>`
//! and parsed whole; if it is no call, the span is text.
//!
//! An opened call whose body turns out malformed ([`Step::Malformed`]) is closed at once and
//! the rest of its span is dropped: its markup is the model's syntax, never answer text.

use serde_json::{Map, Value};
use tether_common::tokenizer::{TOOL_CALL_CLOSE, TOOL_CALL_OPEN};

/// The longest body the parser waits on for a streaming header before buffering the span.
const MAX_HEADER: usize = 1024;

/// What a piece of the span means for the output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The call starts: open its item.
    Open { name: String },
    /// More of the opened call's arguments.
    Arguments(String),
    /// A complete call. When one was opened, `arguments` is the concatenation of its
    /// [`Step::Arguments`]; otherwise (a buffered span) the item is made whole.
    Call { name: String, arguments: String },
    /// The span is not a call: it is text, markup included.
    Text(String),
    /// The opened call's body is not a valid call: close it unfinished.
    Malformed,
    /// Generation stopped early inside the opened call: close it unfinished.
    Cut,
    /// The span ended with its closing tag; `rest` is the text that followed it.
    End { rest: String },
}

enum Phase {
    /// Waiting for `{"name": "...", "arguments":` and the first character of the value.
    Header,
    /// The body has another shape: waiting for the closing tag, then parsing it whole.
    Buffered,
    /// Inside the arguments object.
    Object(ObjectScan),
    /// Inside the arguments string (`body[scanned..]` is undecoded).
    Str,
    /// The arguments are complete: waiting for the closing tag.
    Tail,
    /// The opened call was malformed: dropping the span up to its closing tag.
    Skipping,
    /// The span ended.
    Ended,
}

/// The parser of one span.
pub struct CallParser {
    /// Everything after `<tool_call>` so far (up to the closing tag once it arrived).
    body: String,
    /// How far the current phase has read `body`.
    scanned: usize,
    phase: Phase,
    name: String,
    /// The arguments passed on so far.
    arguments: String,
}

impl Default for CallParser {
    fn default() -> Self {
        Self::new()
    }
}

impl CallParser {
    pub fn new() -> Self {
        CallParser {
            body: String::new(),
            scanned: 0,
            phase: Phase::Header,
            name: String::new(),
            arguments: String::new(),
        }
    }

    /// Consumes generated text. The last step is [`Step::End`] when the span ended.
    pub fn push(&mut self, text: &str) -> Vec<Step> {
        self.body.push_str(text);
        let mut steps = Vec::new();
        self.advance(&mut steps);
        steps
    }

    /// Ends the span where generation stopped: `natural` for the model's own stop, false
    /// when it was cut (`max_output_tokens`) or failed.
    ///
    /// Not opened: the span is text at a natural stop (an unterminated call is no call) and
    /// dropped otherwise (a cut tag is markup). Opened: a natural stop completes the call if
    /// its body is a whole call (only the closing tag missing), else it is malformed; an early
    /// stop cuts it.
    pub fn finish(self, natural: bool) -> Vec<Step> {
        match self.phase {
            Phase::Header | Phase::Buffered if natural => vec![Step::Text(format!("{TOOL_CALL_OPEN}{}", self.body))],
            Phase::Header | Phase::Buffered | Phase::Skipping | Phase::Ended => Vec::new(),
            Phase::Tail if natural => vec![self.verdict(&self.body)],
            Phase::Object(_) | Phase::Str if natural => vec![Step::Malformed],
            Phase::Object(_) | Phase::Str | Phase::Tail => vec![Step::Cut],
        }
    }

    fn advance(&mut self, steps: &mut Vec<Step>) {
        loop {
            match &mut self.phase {
                Phase::Header => match parse_header(&self.body) {
                    // A closing tag inside an unfinished header ends the wait: no streamed call.
                    Header::Incomplete if self.body.len() <= MAX_HEADER && !self.body.contains(TOOL_CALL_CLOSE) => {
                        return;
                    }
                    Header::Incomplete | Header::Mismatch => self.phase = Phase::Buffered,
                    Header::Matched { name, value_at, string } => {
                        self.name = name.clone();
                        steps.push(Step::Open { name });
                        if string {
                            self.scanned = value_at + 1;
                            self.phase = Phase::Str;
                        } else {
                            self.scanned = value_at;
                            self.phase = Phase::Object(ObjectScan::default());
                        }
                    }
                },
                Phase::Buffered => {
                    let Some(rest) = self.close() else { return };
                    let body = &self.body;
                    steps.push(match parse_call(body) {
                        Some((name, arguments)) => Step::Call { name, arguments },
                        None => Step::Text(format!("{TOOL_CALL_OPEN}{body}{TOOL_CALL_CLOSE}")),
                    });
                    steps.push(Step::End { rest });
                    return;
                }
                Phase::Object(scan) => {
                    let mut delta = String::new();
                    let scanned = scan.scan(&self.body[self.scanned..], &mut delta);
                    self.pass_on(delta, steps);
                    match scanned {
                        Scanned::More => {
                            self.scanned = self.body.len();
                            return;
                        }
                        Scanned::Closed(at) => {
                            self.scanned += at;
                            if serde_json::from_str::<Map<String, Value>>(&self.arguments).is_ok() {
                                self.phase = Phase::Tail;
                            } else {
                                self.malformed(steps);
                            }
                        }
                        Scanned::Bad(at) => {
                            self.scanned += at;
                            self.malformed(steps);
                        }
                    }
                }
                Phase::Str => {
                    let raw = &self.body[self.scanned..];
                    let (cut, closed) = string_prefix(raw);
                    let Ok(decoded) = serde_json::from_str::<String>(&format!("\"{}\"", &raw[..cut])) else {
                        self.malformed(steps);
                        continue;
                    };
                    self.pass_on(decoded, steps);
                    self.scanned += cut;
                    if !closed {
                        return;
                    }
                    self.scanned += 1;
                    self.phase = Phase::Tail;
                }
                Phase::Tail => {
                    let Some(rest) = self.close() else { return };
                    steps.push(self.verdict(&self.body));
                    steps.push(Step::End { rest });
                    return;
                }
                Phase::Skipping => {
                    let Some(rest) = self.close() else { return };
                    steps.push(Step::End { rest });
                    return;
                }
                Phase::Ended => return,
            }
        }
    }

    fn pass_on(&mut self, delta: String, steps: &mut Vec<Step>) {
        if !delta.is_empty() {
            self.arguments.push_str(&delta);
            steps.push(Step::Arguments(delta));
        }
    }

    fn malformed(&mut self, steps: &mut Vec<Step>) {
        steps.push(Step::Malformed);
        self.phase = Phase::Skipping;
    }

    /// Finds the closing tag from `scanned`: truncates the body there and returns the text
    /// after it (the span has ended), or remembers where to look next.
    fn close(&mut self) -> Option<String> {
        let Some(found) = self.body[self.scanned..].find(TOOL_CALL_CLOSE) else {
            let mut from = self.body.len().saturating_sub(TOOL_CALL_CLOSE.len() - 1).max(self.scanned);
            while !self.body.is_char_boundary(from) {
                from -= 1;
            }
            self.scanned = from.max(self.scanned);
            return None;
        };
        let end = self.scanned + found;
        let rest = self.body[end + TOOL_CALL_CLOSE.len()..].to_owned();
        self.body.truncate(end);
        self.phase = Phase::Ended;
        Some(rest)
    }

    /// Whether the whole body is the call that was streamed.
    fn verdict(&self, body: &str) -> Step {
        let Ok(Value::Object(wrapper)) = serde_json::from_str::<Value>(body.trim()) else { return Step::Malformed };
        let same_name = wrapper.get("name").and_then(Value::as_str) == Some(self.name.as_str());
        let same_arguments = match wrapper.get("arguments") {
            Some(Value::String(text)) => *text == self.arguments,
            Some(object @ Value::Object(_)) => {
                serde_json::from_str::<Value>(&self.arguments).ok().as_ref() == Some(object)
            }
            _ => false,
        };
        if same_name && same_arguments {
            Step::Call { name: self.name.clone(), arguments: self.arguments.clone() }
        } else {
            Step::Malformed
        }
    }
}

/// Parses a whole tool call body: `{"name": "...", "arguments": {...} | "..."}`.
pub fn parse_call(body: &str) -> Option<(String, String)> {
    let value: Value = serde_json::from_str(body.trim()).ok()?;
    let name = value.get("name")?.as_str()?.to_owned();
    let arguments = match value.get("arguments") {
        Some(Value::String(text)) => text.clone(),
        Some(object @ Value::Object(_)) => object.to_string(),
        None => "{}".to_owned(),
        Some(_) => return None,
    };
    Some((name, arguments))
}

enum Header {
    Incomplete,
    Mismatch,
    /// `value_at` is the byte offset of the arguments' first character; `string` if it is `"`.
    Matched {
        name: String,
        value_at: usize,
        string: bool,
    },
}

/// Matches `{"name": <string>, "arguments": ` and the first character of the value.
fn parse_header(body: &str) -> Header {
    let mut cursor = Cursor { text: body, at: 0 };
    let matched = (|| {
        for literal in ["{", "\"name\"", ":"] {
            cursor.literal(literal)?;
        }
        let name = cursor.string()?;
        for literal in [",", "\"arguments\"", ":"] {
            cursor.literal(literal)?;
        }
        cursor.space();
        match cursor.text[cursor.at..].chars().next() {
            None => Err(Header::Incomplete),
            Some(first @ ('{' | '"')) => Ok(Header::Matched { name, value_at: cursor.at, string: first == '"' }),
            Some(_) => Err(Header::Mismatch),
        }
    })();
    matched.unwrap_or_else(|header| header)
}

struct Cursor<'a> {
    text: &'a str,
    at: usize,
}

impl Cursor<'_> {
    fn space(&mut self) {
        let rest = &self.text[self.at..];
        self.at += rest.len() - rest.trim_start_matches(is_json_space).len();
    }

    /// Skips whitespace, then `literal`.
    fn literal(&mut self, literal: &str) -> Result<(), Header> {
        self.space();
        let rest = &self.text[self.at..];
        if rest.starts_with(literal) {
            self.at += literal.len();
            Ok(())
        } else if literal.starts_with(rest) {
            Err(Header::Incomplete)
        } else {
            Err(Header::Mismatch)
        }
    }

    /// Skips whitespace, then a whole JSON string, returning its value.
    fn string(&mut self) -> Result<String, Header> {
        self.space();
        let start = self.at;
        self.literal("\"")?;
        let (length, closed) = string_prefix(&self.text[self.at..]);
        if !closed {
            return Err(Header::Incomplete);
        }
        self.at += length + 1;
        serde_json::from_str(&self.text[start..self.at]).map_err(|_| Header::Mismatch)
    }
}

fn is_json_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r')
}

/// Reads the content of a JSON string (after its opening quote): returns how many bytes form
/// whole characters and escapes (never half an escape or a lone high surrogate's escape),
/// and whether the closing quote follows them. A malformed escape is included, so decoding
/// the prefix reports it.
fn string_prefix(raw: &str) -> (usize, bool) {
    let bytes = raw.as_bytes();
    let mut at = 0;
    while at < bytes.len() {
        match bytes[at] {
            b'"' => return (at, true),
            b'\\' => match bytes.get(at + 1) {
                None => return (at, false),
                Some(b'u') => {
                    let Some(hex) = bytes.get(at + 2..at + 6) else { return (at, false) };
                    let unit = std::str::from_utf8(hex).ok().and_then(|hex| u16::from_str_radix(hex, 16).ok());
                    match unit {
                        None => return (bytes.len(), false),
                        // A high surrogate decodes only with the low one after it.
                        Some(0xD800..=0xDBFF) if bytes.len() < at + 12 => return (at, false),
                        Some(0xD800..=0xDBFF) => at += 12,
                        Some(_) => at += 6,
                    }
                }
                Some(_) => at += 2,
            },
            _ => at += 1,
        }
    }
    (bytes.len(), false)
}

/// Where an object scan stopped.
enum Scanned {
    /// The text is used up inside the object.
    More,
    /// The object closed; the offset just after its `}`.
    Closed(usize),
    /// A character that cannot be JSON outside a string, at this offset.
    Bad(usize),
}

/// Tracks an arguments object's text: strings, escapes and nesting depth.
#[derive(Default)]
struct ObjectScan {
    depth: u32,
    in_string: bool,
    escape: bool,
    /// Whitespace was skipped since `last`.
    space: bool,
    last: Option<char>,
}

impl ObjectScan {
    /// Scans `text`, appending the object's text to `out` without the whitespace between
    /// tokens (one space stays between two scalars, so `1 2` is not read as `12`).
    fn scan(&mut self, text: &str, out: &mut String) -> Scanned {
        fn scalar(c: char) -> bool {
            c.is_ascii_alphanumeric() || matches!(c, '-' | '+' | '.')
        }
        for (at, c) in text.char_indices() {
            if self.in_string {
                out.push(c);
                if self.escape {
                    self.escape = false;
                } else if c == '\\' {
                    self.escape = true;
                } else if c == '"' {
                    self.in_string = false;
                    self.last = Some(c);
                }
                continue;
            }
            if is_json_space(c) {
                self.space = true;
                continue;
            }
            if !(scalar(c) || matches!(c, '{' | '}' | '[' | ']' | ',' | ':' | '"')) {
                return Scanned::Bad(at);
            }
            if std::mem::take(&mut self.space) && self.last.is_some_and(scalar) && scalar(c) {
                out.push(' ');
            }
            out.push(c);
            self.last = Some(c);
            match c {
                '"' => self.in_string = true,
                '{' | '[' => self.depth += 1,
                '}' | ']' => {
                    self.depth = self.depth.saturating_sub(1);
                    if self.depth == 0 {
                        return Scanned::Closed(at + 1);
                    }
                }
                _ => {}
            }
        }
        Scanned::More
    }
}

#[cfg(test)]
mod tests {
    use super::{CallParser, Step, parse_header, string_prefix};

    /// Feeds `pieces`, then finishes; returns all steps.
    fn run(pieces: &[&str], natural: bool) -> Vec<Step> {
        let mut parser = CallParser::new();
        let mut steps = Vec::new();
        for piece in pieces {
            steps.extend(parser.push(piece));
            if matches!(steps.last(), Some(Step::End { .. })) {
                return steps;
            }
        }
        steps.extend(parser.finish(natural));
        steps
    }

    fn arguments(steps: &[Step]) -> String {
        steps.iter().filter_map(|step| if let Step::Arguments(a) = step { Some(a.as_str()) } else { None }).collect()
    }

    #[test]
    fn opens_at_the_header_and_streams_the_object() {
        let mut parser = CallParser::new();
        assert!(parser.push("{\"name\": \"run\", \"argu").is_empty());
        assert_eq!(parser.push("ments\": "), vec![]);
        assert_eq!(parser.push("{\"a\""), vec![Step::Open { name: "run".into() }, Step::Arguments("{\"a\"".into())]);
        assert_eq!(parser.push(": 1, \"b\": [1, 2]"), vec![Step::Arguments(":1,\"b\":[1,2]".into())]);
        assert_eq!(parser.push("}"), vec![Step::Arguments("}".into())]);
        assert_eq!(parser.push("}\n</tool_"), vec![]);
        assert_eq!(
            parser.push("call> after"),
            vec![
                Step::Call { name: "run".into(), arguments: "{\"a\":1,\"b\":[1,2]}".into() },
                Step::End { rest: " after".into() }
            ]
        );
    }

    #[test]
    fn a_string_body_keeps_its_spaces_and_markup() {
        let steps = run(&["{\"name\":\"x\",\"arguments\":{\"q\": \"a  b </tool_call> {\\\"}\"}}</tool_call>"], true);
        let expected = "{\"q\":\"a  b </tool_call> {\\\"}\"}";
        assert_eq!(arguments(&steps), expected);
        assert!(steps.contains(&Step::Call { name: "x".into(), arguments: expected.into() }));
    }

    #[test]
    fn string_arguments_are_decoded_as_they_arrive() {
        let body = "{\"name\":\"x\",\"arguments\":\"{\\\"a\\\":\\\"\\u00e9\\ud83d\\ude00\\\"}\"}</tool_call>";
        for split in (0..=body.len()).filter(|&at| body.is_char_boundary(at)) {
            let steps = run(&[&body[..split], &body[split..]], true);
            assert_eq!(arguments(&steps), "{\"a\":\"é😀\"}", "split at {split}");
            assert!(steps.contains(&Step::Call { name: "x".into(), arguments: "{\"a\":\"é😀\"}".into() }));
        }
    }

    #[test]
    fn other_shapes_are_buffered_and_parsed_whole() {
        let steps = run(&["{\"arguments\":{\"a\":1},", "\"name\":\"x\"}</tool_call>"], true);
        assert_eq!(steps[0], Step::Call { name: "x".into(), arguments: "{\"a\":1}".into() });
        let steps = run(&["{\"name\":\"x\"}</tool_call>"], true);
        assert_eq!(steps[0], Step::Call { name: "x".into(), arguments: "{}".into() });
        let steps = run(&["not json</tool_call>rest"], true);
        assert_eq!(
            steps,
            vec![Step::Text("<tool_call>not json</tool_call>".into()), Step::End { rest: "rest".into() }]
        );
        let steps = run(&["{\"name\":\"ab</tool_call>", " text"], true);
        assert_eq!(steps[0], Step::Text("<tool_call>{\"name\":\"ab</tool_call>".into()), "no wait past the tag");
        let steps = run(&["{\"name\":\"x\",\"arguments\":[1]}</tool_call>"], true);
        assert!(matches!(&steps[0], Step::Text(_)), "array arguments are no call: {steps:?}");
    }

    #[test]
    fn a_malformed_opened_call_is_closed_and_its_span_dropped() {
        let steps = run(&["{\"name\":\"x\",\"arguments\":{\"a\":1</tool_call>after"], true);
        assert_eq!(
            steps,
            vec![
                Step::Open { name: "x".into() },
                Step::Arguments("{\"a\":1".into()),
                Step::Malformed,
                Step::End { rest: "after".into() }
            ]
        );
        let steps = run(&["{\"name\":\"x\",\"arguments\":{\"a\" 1}}</tool_call>"], true);
        assert!(steps.contains(&Step::Malformed), "{steps:?}");
        let steps = run(&["{\"name\":\"x\",\"arguments\":{\"a\":1 2}}</tool_call>"], true);
        assert!(steps.contains(&Step::Malformed), "`1 2` is not `12`: {steps:?}");
        let steps = run(&["{\"name\":\"x\",\"arguments\":{\"a\":1}, garbage</tool_call>"], true);
        assert!(steps.contains(&Step::Malformed), "{steps:?}");
        let steps = run(&["{\"name\":\"x\",\"arguments\":\"\\q\"}</tool_call>"], true);
        assert!(steps.contains(&Step::Malformed), "{steps:?}");
    }

    #[test]
    fn where_generation_stops_decides_an_open_call() {
        let open = "{\"name\":\"x\",\"arguments\":{\"a\":";
        assert_eq!(run(&[open], false).last(), Some(&Step::Cut));
        assert_eq!(run(&[open], true).last(), Some(&Step::Malformed));
        let whole = "{\"name\":\"x\",\"arguments\":{\"a\":1}}";
        assert_eq!(run(&[whole], true).last(), Some(&Step::Call { name: "x".into(), arguments: "{\"a\":1}".into() }));
        assert_eq!(run(&[whole], false).last(), Some(&Step::Cut));
        assert_eq!(run(&["{\"name\":"], true), vec![Step::Text("<tool_call>{\"name\":".into())]);
        assert_eq!(run(&["{\"name\":"], false), vec![]);
    }

    #[test]
    fn a_header_needs_a_whole_name() {
        assert!(matches!(parse_header("{\"name\":\"ab"), super::Header::Incomplete));
        assert!(matches!(parse_header(" { \"name\" : \"a\\\"b\" , \"arguments\" :  "), super::Header::Incomplete));
        assert!(
            matches!(parse_header("{\"name\":\"a\\\"b\",\"arguments\":{"), super::Header::Matched { name, .. } if name == "a\"b")
        );
        assert!(matches!(parse_header("{\"arguments\":"), super::Header::Mismatch));
        assert!(matches!(parse_header("{\"name\":1"), super::Header::Mismatch));
    }

    #[test]
    fn string_prefixes_stop_before_partial_escapes() {
        assert_eq!(string_prefix("ab\\"), (2, false));
        assert_eq!(string_prefix("ab\\u00"), (2, false));
        assert_eq!(string_prefix("ab\\ud83d"), (2, false));
        assert_eq!(string_prefix("ab\\ud83d\\ude00c\""), (15, true));
        assert_eq!(string_prefix("a\\\"b\"c"), (4, true));
        assert_eq!(string_prefix("é"), (2, false));
    }
}
