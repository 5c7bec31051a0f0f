//! What a publisher's payload means: the envelope rule of the contract, applied identically to
//! Redis messages and `POST /publish` bodies.
//!
//! Invariants: a JSON object with a `data` member is an envelope (`event` optional; `data` sent
//! as is when a string, compact JSON otherwise; `id` ignored); anything else is the data,
//! verbatim. Event names with CR, LF or NUL, over 256 bytes, or starting with `gateway.` are
//! refused, as is a payload over the configured size. Parsing never panics.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

/// Longest event name, in bytes.
pub const MAX_EVENT_NAME_BYTES: usize = 256;

/// Prefix reserved for the gateway's own control events.
pub const RESERVED_PREFIX: &str = "gateway.";

/// An event ready to be framed: borrowed from the payload where possible.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event<'a> {
    /// Position in history, for durable events.
    pub id: Option<Cow<'a, str>>,
    /// Event type (`event:` field).
    pub event: Option<Cow<'a, str>>,
    /// Data, split into `data:` lines by the encoder.
    pub data: Cow<'a, [u8]>,
}

/// Why a payload is not delivered; also the `events_dropped_total` reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejected {
    /// Bigger than `SSE_GATEWAY_MAX_EVENT_BYTES`.
    Oversize {
        /// Size of the payload.
        bytes: usize,
        /// The configured limit.
        limit: usize,
    },
    /// An event name the wire cannot carry or that is reserved.
    Invalid(String),
}

impl Rejected {
    /// The metric reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Rejected::Oversize { .. } => "oversize",
            Rejected::Invalid(_) => "invalid",
        }
    }
}

impl std::fmt::Display for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rejected::Oversize { bytes, limit } => write!(
                f,
                "event is {bytes} bytes; SSE_GATEWAY_MAX_EVENT_BYTES allows {limit}"
            ),
            Rejected::Invalid(why) => f.write_str(why),
        }
    }
}

/// Checks a publisher-chosen event name.
pub fn validate_event_name(name: &str) -> Result<(), Rejected> {
    if name.len() > MAX_EVENT_NAME_BYTES {
        return Err(Rejected::Invalid(format!(
            "event name is {} bytes; the limit is {MAX_EVENT_NAME_BYTES}",
            name.len()
        )));
    }
    if name.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0)) {
        return Err(Rejected::Invalid(
            "event name contains CR, LF or NUL".into(),
        ));
    }
    if name.starts_with(RESERVED_PREFIX) {
        return Err(Rejected::Invalid(format!(
            "event names starting with {RESERVED_PREFIX:?} are reserved for the gateway"
        )));
    }
    Ok(())
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow, default)]
    event: Option<Cow<'a, str>>,
    #[serde(borrow)]
    data: &'a RawValue,
}

/// Applies the envelope rule to a publisher's payload.
pub fn parse_payload(payload: &[u8], max_bytes: usize) -> Result<Event<'_>, Rejected> {
    if payload.len() > max_bytes {
        return Err(Rejected::Oversize {
            bytes: payload.len(),
            limit: max_bytes,
        });
    }
    let verbatim = || Event {
        id: None,
        event: None,
        data: Cow::Borrowed(payload),
    };
    // Cheap pre-check: only something that starts like an object can be an envelope.
    if payload.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Ok(verbatim());
    }
    let Ok(envelope) = serde_json::from_slice::<Envelope<'_>>(payload) else {
        return Ok(verbatim());
    };
    let event = match envelope.event {
        Some(name) if name.is_empty() => None,
        Some(name) => {
            validate_event_name(&name)?;
            Some(name)
        }
        None => None,
    };
    let raw = envelope.data.get();
    let data = if raw.starts_with('"') {
        match serde_json::from_str::<Cow<'_, str>>(raw) {
            Ok(Cow::Borrowed(s)) => Cow::Borrowed(s.as_bytes()),
            Ok(Cow::Owned(s)) => Cow::Owned(s.into_bytes()),
            Err(_) => return Ok(verbatim()),
        }
    } else {
        compact_json(raw)
    };
    Ok(Event {
        id: None,
        event,
        data,
    })
}

/// How a stored join or leave begins: a NUL byte, which no publisher's durable payload may start
/// with (the publish function refuses it), so only the gateway's presence function can store one.
/// The rest is `join\0<sub>` or `leave\0<sub>`.
pub const PRESENCE_MARKER: &[u8] = b"\0P\0";

/// A user-level presence transition, stored in the channel's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    /// The user's first stream on the channel, anywhere.
    Join,
    /// The user's last stream went away and they did not come back within the grace.
    Leave,
}

impl Presence {
    /// The word stored after the marker, and used as a metric label.
    pub fn word(self) -> &'static str {
        match self {
            Presence::Join => "join",
            Presence::Leave => "leave",
        }
    }
}

/// The stored payload of a presence transition (what the in-memory presence appends; the
/// Redis presence function builds the same bytes).
pub fn presence_payload(kind: Presence, sub: &str) -> Vec<u8> {
    let mut out = PRESENCE_MARKER.to_vec();
    out.extend_from_slice(kind.word().as_bytes());
    out.push(0);
    out.extend_from_slice(sub.as_bytes());
    out
}

/// Reads a stored payload as a presence transition: `gateway.join`/`gateway.leave` with
/// `data: {"sub": …}`. `None` for every other payload, including a marker with anything but
/// `join`/`leave` after it. Only payloads from history (or from signed durable messages) may be
/// read this way: a raw pub/sub message is never a presence event.
pub fn parse_presence(payload: &[u8]) -> Option<Event<'static>> {
    let rest = payload.strip_prefix(PRESENCE_MARKER)?;
    let (name, sub) = if let Some(sub) = rest.strip_prefix(b"join\0") {
        ("gateway.join", sub)
    } else {
        ("gateway.leave", rest.strip_prefix(b"leave\0")?)
    };
    let sub = std::str::from_utf8(sub).ok()?;
    Some(Event {
        id: None,
        event: Some(Cow::Borrowed(name)),
        data: Cow::Owned(serde_json::json!({ "sub": sub }).to_string().into_bytes()),
    })
}

/// A stored durable payload as an event, and whether it is a presence transition (which only
/// streams that asked with `?presence=1` receive): the one reading of history shared by live
/// delivery and replay.
pub fn parse_stored(payload: &[u8], max_bytes: usize) -> Result<(Event<'_>, bool), Rejected> {
    match parse_presence(payload) {
        Some(event) => Ok((event, true)),
        None => parse_payload(payload, max_bytes).map(|e| (e, false)),
    }
}

/// Removes insignificant whitespace from valid JSON text, borrowing when there is none.
fn compact_json(raw: &str) -> Cow<'_, [u8]> {
    let bytes = raw.as_bytes();
    let mut in_string = false;
    let mut escaped = false;
    let needs_work = bytes.iter().any(|b| {
        let ws_outside = !in_string && matches!(b, b' ' | b'\t' | b'\n' | b'\r');
        track(&mut in_string, &mut escaped, *b);
        ws_outside
    });
    if !needs_work {
        return Cow::Borrowed(bytes);
    }
    let mut out = Vec::with_capacity(bytes.len());
    in_string = false;
    escaped = false;
    for &b in bytes {
        if in_string || !matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            out.push(b);
        }
        track(&mut in_string, &mut escaped, b);
    }
    Cow::Owned(out)
}

fn track(in_string: &mut bool, escaped: &mut bool, b: u8) {
    if *in_string {
        if *escaped {
            *escaped = false;
        } else if b == b'\\' {
            *escaped = true;
        } else if b == b'"' {
            *in_string = false;
        }
    } else if b == b'"' {
        *in_string = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn data(p: &str) -> String {
        String::from_utf8(
            parse_payload(p.as_bytes(), 65536)
                .unwrap()
                .data
                .into_owned(),
        )
        .unwrap()
    }

    #[test]
    fn raw_payloads_are_verbatim() {
        assert_eq!(data("hello"), "hello");
        assert_eq!(data("[1, 2]"), "[1, 2]");
        assert_eq!(data("{\"x\": 1}"), "{\"x\": 1}");
        assert_eq!(data("{not json"), "{not json");
    }

    #[test]
    fn envelopes_unwrap() {
        let e = parse_payload(br#"{"event":"price","data":"up","id":"x"}"#, 100).unwrap();
        assert_eq!(e.event.as_deref(), Some("price"));
        assert_eq!(&*e.data, b"up");
        assert_eq!(e.id, None);
        assert_eq!(
            data(r#"{"data": {"a": [1, 2], "s": "x y\" z"}}"#),
            r#"{"a":[1,2],"s":"x y\" z"}"#
        );
        assert_eq!(data(r#"{"data":"line1\nline2"}"#), "line1\nline2");
        assert_eq!(data(r#"{"data":null}"#), "null");
    }

    #[test]
    fn refusals() {
        assert_eq!(
            parse_payload(&[b'x'; 11], 10).unwrap_err().reason(),
            "oversize"
        );
        for name in ["a\nb", "a\rb", "a\u{0}b", "gateway.gap"] {
            let p = serde_json::json!({"event": name, "data": "x"}).to_string();
            assert_eq!(
                parse_payload(p.as_bytes(), 1000).unwrap_err().reason(),
                "invalid"
            );
        }
        let long = serde_json::json!({"event": "e".repeat(257), "data": "x"}).to_string();
        assert!(parse_payload(long.as_bytes(), 10000).is_err());
    }

    #[test]
    fn presence_payloads_round_trip() {
        for (kind, name) in [
            (Presence::Join, "gateway.join"),
            (Presence::Leave, "gateway.leave"),
        ] {
            let stored = presence_payload(kind, "al\"ice");
            let (event, presence) = parse_stored(&stored, 10).unwrap();
            assert!(presence);
            assert_eq!(event.event.as_deref(), Some(name));
            assert_eq!(&*event.data, br#"{"sub":"al\"ice"}"#);
        }
        // Anything else after the marker is not presence (and stays verbatim data).
        let (event, presence) = parse_stored(b"\0P\0kick\0bob", 100).unwrap();
        assert!(!presence);
        assert_eq!(event.event, None);
        assert!(parse_presence(b"join\0bob").is_none());
    }

    proptest! {
        #[test]
        fn never_panics(p in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_payload(&p, 1024);
        }

        #[test]
        fn compaction_keeps_the_value(v in proptest::collection::vec(".*", 0..4)) {
            let pretty = serde_json::to_string_pretty(&serde_json::json!({"k": v, "n": [1, {"a": null}]})).unwrap();
            let compact = compact_json(&pretty);
            let back: serde_json::Value = serde_json::from_slice(&compact).unwrap();
            let orig: serde_json::Value = serde_json::from_str(&pretty).unwrap();
            prop_assert_eq!(back, orig);
            prop_assert!(!compact.contains(&b'\n'));
        }
    }
}
