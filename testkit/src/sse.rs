//! The SSE wire format as a client reads it: chunked transfer coding undone, lines split on
//! LF (CRLF and a lone CR too), fields `id`, `event`, `data`, a blank line dispatching a block,
//! comments skipped, data lines joined with LF — the WHATWG `EventSource` rules.

/// One dispatched block: what a blank line ends. A block may carry only an `id:` (it moves a
/// browser's `Last-Event-ID` but fires no event) or only `retry:` (then it is not reported).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Block {
    /// The `id:` field, when the block has one.
    pub id: Option<String>,
    /// The `event:` field.
    pub event: Option<String>,
    /// The data lines joined with LF; `None` when the block had no `data:` line.
    pub data: Option<String>,
}

/// An event as `EventSource` fires it: a block that carried data.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseEvent {
    /// The block's `id:`, if it had one.
    pub id: Option<String>,
    /// The event type (`None` = `message`).
    pub event: Option<String>,
    /// The data.
    pub data: String,
}

impl Block {
    /// The event a browser would fire for this block, if any.
    pub fn into_event(self) -> Option<SseEvent> {
        let data = self.data?;
        Some(SseEvent {
            id: self.id,
            event: self.event,
            data,
        })
    }
}

/// Undoes chunked transfer coding on bytes fed in pieces split anywhere.
#[derive(Debug, Default)]
pub struct Dechunker {
    raw: Vec<u8>,
    /// The last chunk (size 0) arrived, or a size line was not a size: the body has ended.
    pub ended: bool,
}

impl Dechunker {
    /// Appends to `body` the payload of every chunk that `bytes` completes.
    pub fn feed(&mut self, bytes: &[u8], body: &mut Vec<u8>) {
        self.raw.extend_from_slice(bytes);
        let mut at = 0;
        while !self.ended {
            let Some(eol) = self.raw[at..].windows(2).position(|w| w == b"\r\n") else {
                break;
            };
            let size = std::str::from_utf8(&self.raw[at..at + eol])
                .ok()
                .and_then(|s| usize::from_str_radix(s.split(';').next()?.trim(), 16).ok());
            let Some(size) = size.filter(|&s| s > 0) else {
                self.ended = true;
                break;
            };
            let start = at + eol + 2;
            if self.raw.len() < start + size + 2 {
                break;
            }
            body.extend_from_slice(&self.raw[start..start + size]);
            at = start + size + 2;
        }
        self.raw.drain(..at);
    }
}

/// Decodes a response body (chunked or not) fed in pieces split anywhere.
#[derive(Debug, Default)]
pub struct Decoder {
    chunked: Option<Dechunker>,
    body: Vec<u8>,
    block: Block,
    /// The last byte consumed was a CR (a CRLF split between two feeds ends one line).
    after_cr: bool,
}

impl Decoder {
    /// A decoder for a body with (`chunked`) or without chunked transfer coding.
    pub fn new(chunked: bool) -> Self {
        Self {
            chunked: chunked.then(Dechunker::default),
            ..Self::default()
        }
    }

    /// Feeds bytes read from the socket; calls `on_block` for every block that carried an
    /// `id:` or data.
    pub fn feed(&mut self, bytes: &[u8], mut on_block: impl FnMut(Block)) {
        match &mut self.chunked {
            Some(dechunker) => dechunker.feed(bytes, &mut self.body),
            None => self.body.extend_from_slice(bytes),
        }
        let mut consumed = 0;
        while let Some(end) = self.body[consumed..]
            .iter()
            .position(|&b| b == b'\n' || b == b'\r')
        {
            let line_end = consumed + end;
            let terminator = self.body[line_end];
            let line = self.body[consumed..line_end].to_vec();
            consumed = line_end + 1;
            if terminator == b'\n' && self.after_cr && line.is_empty() {
                // The LF of a CRLF: the line already ended at the CR.
                self.after_cr = false;
                continue;
            }
            self.after_cr = terminator == b'\r';
            self.line(&line, &mut on_block);
        }
        self.body.drain(..consumed);
    }

    fn line(&mut self, line: &[u8], on_block: &mut impl FnMut(Block)) {
        if line.is_empty() {
            let mut block = std::mem::take(&mut self.block);
            if let Some(data) = &mut block.data {
                data.pop();
            }
            if block.data.is_some() || block.id.is_some() {
                on_block(block);
            }
            return;
        }
        if line.first() == Some(&b':') {
            return;
        }
        let text = String::from_utf8_lossy(line);
        let (field, value) = match text.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (text.as_ref(), ""),
        };
        match field {
            "data" => {
                // Each line adds its value and an LF; dispatch drops the last LF.
                let data = self.block.data.get_or_insert_with(String::new);
                data.push_str(value);
                data.push('\n');
            }
            "id" => self.block.id = Some(value.to_string()),
            "event" => self.block.event = Some(value.to_string()),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(chunked: bool, wire: &[u8], split: usize) -> Vec<Block> {
        let mut d = Decoder::new(chunked);
        let mut got = Vec::new();
        for piece in wire.chunks(split) {
            d.feed(piece, |b| got.push(b));
        }
        got
    }

    #[test]
    fn decodes_chunked_bodies_split_anywhere() {
        let body =
            b"retry: 1000\n: ok\n\nid: a1\nevent: gateway.gap\ndata: {}\n\nid: a2\ndata: 123 7\n\n";
        let mut wire = Vec::new();
        for part in body.chunks(7) {
            wire.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
            wire.extend_from_slice(part);
            wire.extend_from_slice(b"\r\n");
        }
        for split in [1, 3, 5, 64] {
            let got = decode(true, &wire, split);
            assert_eq!(got.len(), 2, "split {split}");
            assert_eq!(got[0].event.as_deref(), Some("gateway.gap"));
            assert_eq!(got[1].id.as_deref(), Some("a2"));
            assert_eq!(got[1].data.as_deref(), Some("123 7"));
        }
    }

    #[test]
    fn follows_the_whatwg_line_rules() {
        // CRLF, lone CR and LF end lines; data lines join with LF; `data:` alone is an empty
        // event; an id-only block is reported (it moves Last-Event-ID) but fires no event.
        let wire = b"data: a\r\ndata: b\r\n\r\ndata\rdata:\n\nid: 7\n\n:c\nevent: x\ndata:  y\n\n";
        for split in [1, 2, 100] {
            let got = decode(false, wire, split);
            let events: Vec<_> = got.iter().cloned().filter_map(Block::into_event).collect();
            assert_eq!(events.len(), 3, "split {split}: {got:?}");
            assert_eq!(events[0].data, "a\nb");
            assert_eq!(events[1].data, "\n");
            assert_eq!(events[2].event.as_deref(), Some("x"));
            assert_eq!(events[2].data, " y");
            assert_eq!(got[2].id.as_deref(), Some("7"));
            assert_eq!(got[2].data, None);
        }
    }
}
