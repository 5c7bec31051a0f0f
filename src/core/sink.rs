//! Where brokers and histories hand events: the one hot-path entry into the hub.
//!
//! A backend never needs to know the hub: it receives an `Arc<dyn EventSink>`, so the
//! envelope rule, size limit and metrics are the same whatever path an event took, and a
//! backend can be tested against any sink.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use crate::core::event::{parse_payload, parse_stored};
use crate::core::frame;
use crate::core::hub::{Durable, Hub, Queued};
use crate::core::position::{Cursor, Mark};
use crate::metrics as m;

/// What a backend delivers into, and asks about the channels it must carry.
pub trait EventSink: Send + Sync + 'static {
    /// A publisher's fire-and-forget payload on `channel`.
    fn event(&self, channel: &str, payload: &[u8]);
    /// A durable event at `mark`: each stream writes its own `id:` line for it.
    fn durable(&self, channel: &str, mark: &Mark, payload: &[u8]);
    /// `channel`'s history was lost (`gap`, a complete control frame) and now stands at `mark`:
    /// each stream writes the gap once and takes `mark` as its cursor, so the events of the new
    /// epoch that follow are not announced as a second gap.
    fn gap(&self, channel: &str, mark: &Mark, gap: Bytes);
    /// A complete control frame (such as a gap without a new mark) for every stream on `channel`.
    fn control(&self, channel: &str, frame: Bytes);
    /// Every channel some local stream listens to (what a broker resubscribes after an outage).
    fn channels(&self) -> Vec<String>;
    /// Whether some local stream still listens to `channel`.
    fn has_channel(&self, channel: &str) -> bool;
    /// Takes user `sub` off this replica: each of their streams says `gateway.disconnected`
    /// and ends. How many streams that was.
    fn disconnect(&self, sub: &str) -> usize;
}

/// The hub as a sink: payloads are parsed and encoded once, then fanned out.
pub struct Fanout {
    hub: Arc<Hub>,
    max_event_bytes: usize,
}

impl Fanout {
    /// A sink that delivers into `hub`, refusing payloads over `max_event_bytes`.
    pub fn new(hub: Arc<Hub>, max_event_bytes: usize) -> Arc<Self> {
        Arc::new(Self {
            hub,
            max_event_bytes,
        })
    }
}

impl Fanout {
    /// Counts a received payload and frames it (`durable`: read as stored history, which may
    /// hold a presence transition, and left without its end for the `id:` line); a payload that
    /// cannot be framed is counted and logged as dropped. Also says whether it is presence.
    fn frame(&self, payload: &[u8], durable: bool) -> Option<(Bytes, bool)> {
        m::hot().received.increment(1);
        let parsed = if durable {
            parse_stored(payload, self.max_event_bytes)
        } else {
            parse_payload(payload, self.max_event_bytes).map(|e| (e, false))
        };
        let encoded =
            parsed
                .map_err(|e| (e.reason(), e.to_string()))
                .and_then(|(event, presence)| {
                    let framed = if durable {
                        frame::encode_open(&event)
                    } else {
                        frame::encode(&event)
                    };
                    framed
                        .map(|b| (b, presence))
                        .map_err(|e| ("invalid", e.to_string()))
                });
        match encoded {
            Ok(framed) => Some(framed),
            Err((reason, why)) => {
                metrics::counter!(m::EVENTS_DROPPED, "reason" => reason).increment(1);
                tracing::debug!(reason, "event dropped: {why}");
                None
            }
        }
    }
}

impl EventSink for Fanout {
    fn event(&self, channel: &str, payload: &[u8]) {
        let received = Instant::now();
        if let Some((bytes, _)) = self.frame(payload, false) {
            let queued = Queued {
                bytes,
                received,
                durable: None,
            };
            self.hub.deliver(channel, &queued);
        }
    }

    fn durable(&self, channel: &str, mark: &Mark, payload: &[u8]) {
        let received = Instant::now();
        let Some((bytes, presence)) = self.frame(payload, true) else {
            return;
        };
        let channel_arc: Arc<str> = Arc::from(channel);
        let single = Cursor {
            marks: vec![(channel_arc.clone(), mark.clone())],
        };
        let queued = Queued {
            bytes,
            received,
            durable: Some(Arc::new(Durable {
                channel: channel_arc,
                mark: mark.clone(),
                single_id: frame::id_line(&single.encode()),
                reset: false,
                presence,
            })),
        };
        self.hub.deliver(channel, &queued);
    }

    fn gap(&self, channel: &str, mark: &Mark, gap: Bytes) {
        self.hub.deliver(
            channel,
            &Queued {
                bytes: gap,
                received: Instant::now(),
                durable: Some(Arc::new(Durable {
                    channel: Arc::from(channel),
                    mark: mark.clone(),
                    single_id: Bytes::new(),
                    reset: true,
                    presence: false,
                })),
            },
        );
    }

    fn control(&self, channel: &str, frame: Bytes) {
        self.hub.deliver_control(channel, frame);
    }

    fn channels(&self) -> Vec<String> {
        self.hub.channels()
    }

    fn has_channel(&self, channel: &str) -> bool {
        self.hub.has_channel(channel)
    }

    fn disconnect(&self, sub: &str) -> usize {
        let streams = self.hub.streams_of(sub);
        for s in &streams {
            s.request_disconnect();
        }
        streams.len()
    }
}
