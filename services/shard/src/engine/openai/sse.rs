//! A server-sent events decoder for the engine's `stream: true` responses: bytes in, the
//! `data` of each complete event out. Lines end in `\n` or `\r\n` (sse-starlette, which
//! llama-cpp-python uses, writes `\r\n`); comments (`: ping`) and other fields are skipped.

/// Decodes events from a byte stream fed in arbitrary pieces.
#[derive(Debug, Default)]
pub struct SseDecoder {
    buffer: Vec<u8>,
    data: Option<String>,
}

/// Longest event the decoder holds; a larger one means a broken or hostile upstream.
pub const MAX_EVENT_BYTES: usize = 4 << 20;

#[derive(Debug, PartialEq, Eq)]
pub struct EventTooLarge;

impl SseDecoder {
    /// Adds `bytes` and returns the data of every event they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<String>, EventTooLarge> {
        self.buffer.extend_from_slice(bytes);
        let mut events = Vec::new();
        let mut start = 0;
        while let Some(end) = self.buffer[start..].iter().position(|&b| b == b'\n') {
            let mut line = &self.buffer[start..start + end];
            start += end + 1;
            if let Some(stripped) = line.strip_suffix(b"\r") {
                line = stripped;
            }
            if line.is_empty() {
                if let Some(data) = self.data.take() {
                    events.push(data);
                }
                continue;
            }
            let Some(value) = line.strip_prefix(b"data:") else { continue };
            let value = value.strip_prefix(b" ").unwrap_or(value);
            let value = String::from_utf8_lossy(value);
            match &mut self.data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(&value);
                }
                None => self.data = Some(value.into_owned()),
            }
        }
        self.buffer.drain(..start);
        let held = self.buffer.len() + self.data.as_ref().map_or(0, String::len);
        if held > MAX_EVENT_BYTES {
            return Err(EventTooLarge);
        }
        Ok(events)
    }
}

#[cfg(test)]
mod tests {
    use super::SseDecoder;

    #[test]
    fn events_split_anywhere_and_either_line_ending() {
        let stream = b"data: {\"a\":1}\r\n\r\n: ping\r\n\r\ndata: two\ndata: lines\n\nevent: x\ndata: [DONE]\n\n";
        for split in 0..stream.len() {
            let mut decoder = SseDecoder::default();
            let mut events = decoder.push(&stream[..split]).unwrap();
            events.extend(decoder.push(&stream[split..]).unwrap());
            assert_eq!(events, ["{\"a\":1}", "two\nlines", "[DONE]"], "split at {split}");
        }
    }

    #[test]
    fn an_endless_event_is_refused() {
        let mut decoder = SseDecoder::default();
        let line = vec![b'x'; super::MAX_EVENT_BYTES + 1];
        assert!(decoder.push(b"data: ").unwrap().is_empty());
        assert!(decoder.push(&line).is_err());
    }
}
