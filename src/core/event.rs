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
