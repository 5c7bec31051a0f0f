//! Positions, marks and cursors: where a stream stands in each channel's history, and the
//! signed form durable events take on pub/sub. Shared by the hub (which carries marks), the
//! history backends (which make them) and the streams (which write them as `id:`).
//!
//! Invariants:
//! - Each channel's history has an epoch that changes whenever the history is lost (expired,
//!   Redis restarted empty); a cursor from another epoch is a gap, never a silent skip.
//! - Cursors are opaque to clients: one position per channel of the stream, each tagged with a
//!   hash of its channel name, so a cursor from another channel set cannot be misread.
//! - Durable events travel over pub/sub behind a marker that starts with a NUL byte and carries
//!   an HMAC under a key only the history function knows; raw payloads that start with NUL are
//!   reserved for the gateway, and a marked message that does not verify is dropped.

use std::fmt::Write as _;
use std::sync::Arc;

use hmac::{Hmac, Mac};
use sha1::Sha1;

/// A position in one channel's history (a Redis stream id: milliseconds and sequence).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Position {
    /// Milliseconds part.
    pub ms: u64,
    /// Sequence within the millisecond.
    pub seq: u64,
}

impl Position {
    /// Parses `ms-seq`.
    pub fn parse(s: &str) -> Option<Self> {
        let (ms, seq) = s.split_once('-')?;
        if ms.is_empty() || seq.is_empty() || ms.len() > 20 || seq.len() > 20 {
            return None;
        }
        Some(Self {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// The epoch of a channel that has no history yet.
pub const NO_EPOCH: &str = "0";

/// The epoch of the stand-in ids `POST /publish` answers while history is off.
pub const HISTORY_OFF_EPOCH: &str = "off";

/// Asks `History::after` for events after a position in whatever epoch is current (used to
/// fill an outage by time, when no cursor is known). Never a valid epoch in a cursor.
pub const ANY_EPOCH: &str = "*";

/// Where one channel's history stands: its epoch and last position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mark {
    /// History generation (`NO_EPOCH` when the channel has none).
    pub epoch: String,
    /// Last stored position (zero when none).
    pub pos: Position,
}

impl Mark {
    /// What `POST /publish` answers for a channel when history is off: a well-formed position
    /// in an epoch no history ever has, so resuming from it is always a gap.
    pub fn history_off() -> Self {
        Self {
            epoch: HISTORY_OFF_EPOCH.to_string(),
            pos: Position::default(),
        }
    }

    /// The mark of a channel without history.
    pub fn empty() -> Self {
        Self {
            epoch: NO_EPOCH.to_string(),
            pos: Position::default(),
        }
    }
}

/// What starts every durable event on pub/sub (the history library writes it too: the Lua
/// constant is generated from this one).
pub const DURABLE_MARKER: &[u8] = b"\0D2\0";

/// The key that signs durable events on pub/sub (SPEC §6.6): only the history function (which
/// embeds it) can make a message that moves a stream's position; a raw `PUBLISH`, which cannot
/// know it, is at most a fire-and-forget event.
#[derive(Clone)]
pub struct DurableKey {
    hex: String,
    /// HMAC-SHA1 with the key already absorbed; cloned for each message.
    mac: Hmac<Sha1>,
}

impl std::fmt::Debug for DurableKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DurableKey(..)")
    }
}

impl PartialEq for DurableKey {
    fn eq(&self, other: &Self) -> bool {
        self.hex == other.hex
    }
}

fn hex_bytes(hex: &[u8]) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    hex.chunks(2)
        .map(|pair| {
            let text = std::str::from_utf8(pair).ok()?;
            u8::from_str_radix(text, 16).ok()
        })
        .collect()
}

impl DurableKey {
    /// A fresh random key.
    pub fn random() -> Self {
        let bytes: [u8; 32] = rand::random();
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        Self::from_hex(&hex).unwrap_or_else(|| unreachable!("64 hex digits make a key"))
    }

    /// The key as the library embeds it (hex, 64 bytes at most).
    pub fn from_hex(hex: &str) -> Option<Self> {
        let bytes = hex_bytes(hex.as_bytes())?;
        if bytes.is_empty() || bytes.len() > 64 {
            return None;
        }
        let mac = Hmac::<Sha1>::new_from_slice(&bytes).ok()?;
        Some(Self {
            hex: hex.to_ascii_lowercase(),
            mac,
        })
    }

    /// The hex form, for the library's source.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    fn mac_of(&self, channel: &str, epoch: &[u8], id: &[u8], payload: &[u8]) -> Hmac<Sha1> {
        let mut mac = self.mac.clone();
        for part in [channel.as_bytes(), b"\0", epoch, b"\0", id, b"\0", payload] {
            mac.update(part);
        }
        mac
    }
}

/// A durable event as it travels over pub/sub: marker, MAC, epoch, position, payload (what the
/// history function publishes; used by tests and tools).
pub fn encode_durable(
    key: &DurableKey,
    channel: &str,
    epoch: &str,
    pos: Position,
    payload: &[u8],
) -> Vec<u8> {
    let id = pos.to_string();
    let tag = key
        .mac_of(channel, epoch.as_bytes(), id.as_bytes(), payload)
        .finalize()
        .into_bytes();
    let mut out = Vec::with_capacity(DURABLE_MARKER.len() + 41 + epoch.len() + 48 + payload.len());
    out.extend_from_slice(DURABLE_MARKER);
    for b in tag {
        out.extend_from_slice(format!("{b:02x}").as_bytes());
    }
    out.push(0);
    out.extend_from_slice(epoch.as_bytes());
    out.push(0);
    out.extend_from_slice(id.as_bytes());
    out.push(0);
    out.extend_from_slice(payload);
    out
}

/// What a pub/sub message on a channel is.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming<'a> {
    /// A publisher's fire-and-forget payload.
    Plain(&'a [u8]),
    /// A durable event signed with the key: (epoch, position, payload).
    Durable(&'a str, Position, &'a [u8]),
    /// Starts like a durable event but does not verify (forged, or signed with another key).
    Forged,
}

/// Reads a message on `channel`: durable only when its MAC verifies under `key`.
pub fn decode_durable<'a>(
    key: Option<&DurableKey>,
    channel: &str,
    message: &'a [u8],
) -> Incoming<'a> {
    if message.first() != Some(&0) {
        return Incoming::Plain(message);
    }
    let verified = (|| {
        let rest = message.strip_prefix(DURABLE_MARKER)?;
        let key = key?;
        let mut parts = rest.splitn(4, |&b| b == 0);
        let (tag, epoch, id, payload) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let tag = hex_bytes(tag)?;
        key.mac_of(channel, epoch, id, payload)
            .verify_slice(&tag)
            .ok()?;
        let epoch = std::str::from_utf8(epoch).ok()?;
        let pos = Position::parse(std::str::from_utf8(id).ok()?)?;
        Some((epoch, pos, payload))
    })();
    match verified {
        Some((epoch, pos, payload)) => Incoming::Durable(epoch, pos, payload),
        None => Incoming::Forged,
    }
}

/// FNV-1a of a channel name: the tag that ties a cursor position to its channel.
fn channel_tag(channel: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in channel.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// A `Last-Event-ID` that is not a cursor of this gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadCursor;

/// Longest cursor accepted from a client.
pub const MAX_CURSOR_BYTES: usize = 4096;

/// A stream's position in each of its channels: what `id:` carries and `Last-Event-ID` returns.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Cursor {
    /// (channel, mark), in the stream's channel order.
    pub marks: Vec<(Arc<str>, Mark)>,
}

impl Cursor {
    /// The text form: `<tag>.<epoch>.<ms>-<seq>` per channel, joined by `_`.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(self.marks.len() * 40);
        for (i, (channel, mark)) in self.marks.iter().enumerate() {
            if i > 0 {
                out.push('_');
            }
            let _ = write!(
                out,
                "{:08x}.{}.{}",
                channel_tag(channel),
                mark.epoch,
                mark.pos
            );
        }
        out
    }

    /// Reads a client's cursor for these channels: the mark of each channel it carries, or
    /// `None` for a channel it does not know. `Err` when the text is not a cursor at all.
    pub fn decode(text: &str, channels: &[String]) -> Result<Vec<Option<Mark>>, BadCursor> {
        if text.is_empty() || text.len() > MAX_CURSOR_BYTES {
            return Err(BadCursor);
        }
        let mut parsed: Vec<(u32, Mark)> = Vec::new();
        for part in text.split('_') {
            let mut fields = part.split('.');
            let (Some(tag), Some(epoch), Some(pos), None) =
                (fields.next(), fields.next(), fields.next(), fields.next())
            else {
                return Err(BadCursor);
            };
            if tag.len() != 8 || epoch.is_empty() || epoch.len() > 32 {
                return Err(BadCursor);
            }
            if !epoch.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return Err(BadCursor);
            }
            let tag = u32::from_str_radix(tag, 16).map_err(|_| BadCursor)?;
            let pos = Position::parse(pos).ok_or(BadCursor)?;
            parsed.push((
                tag,
                Mark {
                    epoch: epoch.to_string(),
                    pos,
                },
            ));
        }
        Ok(channels
            .iter()
            .map(|c| {
                let tag = channel_tag(c);
                parsed
                    .iter()
                    .find(|(t, _)| *t == tag)
                    .map(|(_, m)| m.clone())
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn durable_messages_verify_only_under_their_key_and_channel() {
        let key = DurableKey::random();
        let pos = Position { ms: 17, seq: 3 };
        let m = encode_durable(&key, "orders", "ab12", pos, b"{\"data\":1}");
        assert_eq!(
            decode_durable(Some(&key), "orders", &m),
            Incoming::Durable("ab12", pos, &b"{\"data\":1}"[..])
        );
        assert_eq!(
            decode_durable(Some(&key), "orders", b"plain"),
            Incoming::Plain(b"plain")
        );
        // Another key, another channel, a changed payload or the old unsigned marker: forged.
        let other = DurableKey::random();
        assert_eq!(decode_durable(Some(&other), "orders", &m), Incoming::Forged);
        assert_eq!(decode_durable(Some(&key), "prices", &m), Incoming::Forged);
        let mut changed = m.clone();
        *changed.last_mut().unwrap() = b'2';
        assert_eq!(
            decode_durable(Some(&key), "orders", &changed),
            Incoming::Forged
        );
        let unsigned = b"\0D1\0ab12\x0018446744073709551615-0\0{\"data\":1}";
        assert_eq!(
            decode_durable(Some(&key), "orders", unsigned),
            Incoming::Forged
        );
        assert_eq!(decode_durable(None, "orders", &m), Incoming::Forged);
    }

    #[test]
    fn cursors_round_trip_and_refuse_garbage() {
        let c = Cursor {
            marks: vec![
                (
                    "a".into(),
                    Mark {
                        epoch: "e1".into(),
                        pos: Position { ms: 5, seq: 0 },
                    },
                ),
                ("b".into(), Mark::empty()),
            ],
        };
        let text = c.encode();
        let back = Cursor::decode(&text, &["b".into(), "a".into(), "z".into()]).unwrap();
        assert_eq!(back[0], Some(Mark::empty()));
        assert_eq!(back[1], Some(c.marks[0].1.clone()));
        assert_eq!(back[2], None);
        for bad in [
            "",
            "x",
            "1.2.3",
            "zzzzzzzz.e.1-1",
            "0000000a.e.1-",
            "0000000a..1-1",
            "0000000a.e!.1-1",
        ] {
            assert!(Cursor::decode(bad, &["a".into()]).is_err(), "{bad:?}");
        }
        assert!(Cursor::decode(&"0".repeat(5000), &["a".into()]).is_err());
    }

    proptest! {
        #[test]
        fn decoding_never_panics(s in ".{0,300}") {
            let _ = Cursor::decode(&s, &["a".to_string(), "b".to_string()]);
        }

        #[test]
        fn decode_inverts_encode(ms in any::<u64>(), seq in any::<u64>(), epoch in "[a-z0-9]{1,16}", ch in "[a-z]{1,10}") {
            let c = Cursor { marks: vec![(ch.as_str().into(), Mark { epoch: epoch.clone(), pos: Position { ms, seq } })] };
            let back = Cursor::decode(&c.encode(), std::slice::from_ref(&ch)).unwrap();
            prop_assert_eq!(back, vec![Some(Mark { epoch, pos: Position { ms, seq } })]);
        }
    }
}
