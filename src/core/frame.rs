//! The one encoder of the WHATWG event-stream format.
//!
//! Invariants: an event is encoded once into `Bytes` and shared by every subscriber; `id:` and
//! `event:` fields are written only when present and can never carry CR, LF or NUL (the encoder
//! returns an error instead of writing them); data is split into one `data:` line per line, with
//! CRLF, CR and LF all ending a line; every frame ends with a blank line.

use bytes::{BufMut, Bytes, BytesMut};

use crate::core::event::Event;

/// A field that the wire cannot carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError(&'static str);

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for FrameError {}

fn single_line(field: &str) -> bool {
    !field.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0))
}

/// Encodes one event.
pub fn encode(event: &Event<'_>) -> Result<Bytes, FrameError> {
    encode_fields(event, true)
}

/// Encodes an event's fields without the blank line that ends it, so that each stream can add
/// its own `id:` line (its cursor over all of its channels) and then end the event.
pub fn encode_open(event: &Event<'_>) -> Result<Bytes, FrameError> {
    encode_fields(event, false)
}

/// The `id:` line and end of a durable event, or a bare id update (no event is dispatched for
/// an `id:` without data, but the client's last event id is set).
pub fn id_line(cursor: &str) -> Bytes {
    let mut out = BytesMut::with_capacity(cursor.len() + 6);
    out.put_slice(b"id: ");
    out.put_slice(cursor.as_bytes());
    out.put_slice(b"\n\n");
    out.freeze()
}

fn encode_fields(event: &Event<'_>, terminate: bool) -> Result<Bytes, FrameError> {
    let id = event.id.as_deref();
    let name = event.event.as_deref();
    if !id.is_none_or(single_line) {
        return Err(FrameError("event id contains CR, LF or NUL"));
    }
    if !name.is_none_or(single_line) {
        return Err(FrameError("event name contains CR, LF or NUL"));
    }
    let data: &[u8] = &event.data;
    let lines = 1 + data.iter().filter(|&&b| b == b'\n' || b == b'\r').count();
    let mut out = BytesMut::with_capacity(
        id.map_or(0, |i| i.len() + 5)
            + name.map_or(0, |n| n.len() + 8)
            + data.len()
            + 7 * lines
            + 1,
    );
    if let Some(id) = id {
        out.put_slice(b"id: ");
        out.put_slice(id.as_bytes());
        out.put_u8(b'\n');
    }
    if let Some(name) = name {
        out.put_slice(b"event: ");
        out.put_slice(name.as_bytes());
        out.put_u8(b'\n');
    }
    let mut rest = data;
    loop {
        out.put_slice(b"data: ");
        match rest.iter().position(|&b| b == b'\n' || b == b'\r') {
            Some(i) => {
                out.put_slice(&rest[..i]);
                out.put_u8(b'\n');
                let skip = if rest[i] == b'\r' && rest.get(i + 1) == Some(&b'\n') {
                    2
                } else {
                    1
                };
                rest = &rest[i + skip..];
            }
            None => {
                out.put_slice(rest);
                out.put_u8(b'\n');
                break;
            }
        }
    }
    if terminate {
        out.put_u8(b'\n');
    }
    Ok(out.freeze())
}

/// The first bytes of every stream: the reconnection hint and a comment, so that proxies and
/// clients see the stream open at once.
pub fn prelude(retry_ms: u64) -> Bytes {
    Bytes::from(format!("retry: {retry_ms}\n: ok\n\n"))
}

/// The keep-alive comment written after a quiet heartbeat interval.
pub const HEARTBEAT: Bytes = Bytes::from_static(b": heartbeat\n\n");

/// A control event of the gateway (`gateway.*`), with a JSON data line.
pub fn control(name: &'static str, data: &str) -> Bytes {
    let event = Event {
        id: None,
        event: Some(name.into()),
        data: data.as_bytes().into(),
    };
    // Names are constants without line breaks, so this cannot fail; fall back to a comment.
    encode(&event).unwrap_or_else(|_| Bytes::from_static(b": control\n\n"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use proptest::prelude::*;
    use std::borrow::Cow;

    fn ev<'a>(id: Option<&'a str>, name: Option<&'a str>, data: &'a str) -> Event<'a> {
        Event {
            id: id.map(Cow::Borrowed),
            event: name.map(Cow::Borrowed),
            data: Cow::Borrowed(data.as_bytes()),
        }
    }

    #[test]
    fn wire_format() {
        assert_eq!(&encode(&ev(None, None, "hi")).unwrap()[..], b"data: hi\n\n");
        assert_eq!(
            &encode(&ev(Some("7"), Some("price"), "a\r\nb\rc\nd")).unwrap()[..],
            b"id: 7\nevent: price\ndata: a\ndata: b\ndata: c\ndata: d\n\n"
        );
        assert_eq!(&encode(&ev(None, None, "")).unwrap()[..], b"data: \n\n");
        assert_eq!(
            &encode(&ev(None, None, "x\n")).unwrap()[..],
            b"data: x\ndata: \n\n"
        );
        assert!(encode(&ev(None, Some("a\nb"), "x")).is_err());
        assert!(encode(&ev(Some("1\r"), None, "x")).is_err());
        assert!(encode(&ev(None, Some("a\0"), "x")).is_err());
    }

    fn parse_all(wire: Vec<u8>) -> Vec<eventsource_stream::Event> {
        let stream = futures_util::stream::iter([Ok::<_, std::convert::Infallible>(
            bytes::Bytes::from(wire),
        )]);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        rt.block_on(async {
            use eventsource_stream::Eventsource;
            stream
                .eventsource()
                .filter_map(|r| async move { r.ok() })
                .collect()
                .await
        })
    }

    proptest! {
        // Any event survives a real SSE parser: data lines re-join with LF, names and ids intact.
        #[test]
        fn round_trips_through_a_real_parser(
            id in proptest::option::of("[^\r\n\0]{1,20}"),
            name in proptest::option::of("[^\r\n\0]{1,20}"),
            data in "(.|\r|\n|\r\n){0,40}",
        ) {
            // A parser strips one leading space of a field value and trims nothing else; names
            // and ids that start with a space are written after "field: ", so they survive.
            let event = ev(id.as_deref(), name.as_deref(), &data);
            let wire = encode(&event).unwrap();
            let parsed = parse_all(wire.to_vec());
            prop_assert_eq!(parsed.len(), 1);
            let got = &parsed[0];
            let expected = data.replace("\r\n", "\n").replace('\r', "\n");
            prop_assert_eq!(&got.data, &expected);
            prop_assert_eq!(&got.event, name.as_deref().unwrap_or("message"));
            if let Some(id) = &id {
                prop_assert_eq!(&got.id, id);
            }
        }

        #[test]
        fn hostile_fields_never_reach_the_wire(name in ".*", id in ".*") {
            let event = ev(Some(&id), Some(&name), "x");
            match encode(&event) {
                Ok(wire) => {
                    let text = String::from_utf8_lossy(&wire);
                    prop_assert_eq!(text.matches('\n').count(), 4);
                    prop_assert!(!text.contains('\r'));
                }
                Err(_) => prop_assert!(!single_line(&name) || !single_line(&id)),
            }
        }
    }
}
