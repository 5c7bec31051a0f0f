//! Resume: where a stream stands in each channel's history, and replaying what it missed.
//!
//! Invariants:
//! - A stream's cursor holds one mark per channel; a durable event at or before the mark of its
//!   channel (same epoch) is a duplicate and is dropped, so "subscribe first, then replay, then
//!   live" never shows an event twice.
//! - A durable event from another epoch than the cursor's means history was lost in between:
//!   the stream says `gateway.gap` before it.
//! - Every durable event written carries the stream's whole cursor as its `id:`.
//! - Replay is paged: at most one page per channel is held in memory at a time.

use std::collections::VecDeque;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures_util::future::BoxFuture;

use crate::backends::history::{History, HistoryError, Page, PAGE, PAGE_BYTES};
use crate::core::event::parse_stored;
use crate::core::frame;
use crate::core::position::{Cursor, Mark, NO_EPOCH};
use crate::metrics as m;

/// What a durable event means for a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fold {
    /// Already delivered (or not one of the stream's channels): drop it.
    Duplicate,
    /// New; `gap` when history was lost since the stream's last mark of that channel.
    New {
        /// History of the channel was lost in between.
        gap: bool,
    },
}

/// A stream's cursor, kept current as events are written.
pub struct Tracker {
    cursor: Cursor,
}

impl Tracker {
    /// A tracker starting at these marks (stream channel order).
    pub fn new(cursor: Cursor) -> Self {
        Self { cursor }
    }

    /// Folds a durable event's mark into the cursor.
    pub fn fold(&mut self, channel: &str, mark: &Mark) -> Fold {
        let Some((_, current)) = self.cursor.marks.iter_mut().find(|(c, _)| &**c == channel) else {
            return Fold::Duplicate;
        };
        if current.epoch == mark.epoch {
            if mark.pos <= current.pos {
                return Fold::Duplicate;
            }
            current.pos = mark.pos;
            return Fold::New { gap: false };
        }
        let gap = current.epoch != NO_EPOCH;
        *current = mark.clone();
        Fold::New { gap }
    }

    /// Moves the cursor of `channel` to `mark` whatever it was (history was lost).
    pub fn reset(&mut self, channel: &str, mark: &Mark) {
        if let Some((_, current)) = self.cursor.marks.iter_mut().find(|(c, _)| &**c == channel) {
            *current = mark.clone();
        }
    }

    /// The `id:` line (and end of event) for the cursor as it stands; `single` is the event's
    /// precomputed line, right when the stream has exactly one channel.
    pub fn id_line(&self, single: Option<&Bytes>) -> Bytes {
        match single {
            Some(line) if self.cursor.marks.len() == 1 => line.clone(),
            _ => frame::id_line(&self.cursor.encode()),
        }
    }
}

/// The `gateway.gap` control event.
pub fn gap_frame(reason: &str) -> Bytes {
    frame::control(
        "gateway.gap",
        &serde_json::json!({ "reason": reason }).to_string(),
    )
}

/// Appends one stored event to `out` (frame + id), if it is new to the stream.
fn write_stored(
    out: &mut BytesMut,
    tracker: &mut Tracker,
    channel: &str,
    mark: &Mark,
    payload: &[u8],
    max_event_bytes: usize,
    presence: bool,
) {
    if let Fold::New { gap } = tracker.fold(channel, mark) {
        if gap {
            out.extend_from_slice(&gap_frame("history_lost"));
        }
        match parse_stored(payload, max_event_bytes) {
            // A join or leave for a stream that did not ask for them: passed over (the cursor
            // moved past it, and the next event's id carries that).
            Ok((_, true)) if !presence => {}
            Ok((event, _)) => match frame::encode_open(&event) {
                Ok(bytes) => {
                    out.extend_from_slice(&bytes);
                    out.extend_from_slice(&tracker.id_line(None));
                }
                Err(_) => {
                    metrics::counter!(m::EVENTS_DROPPED, "reason" => "invalid").increment(1);
                }
            },
            Err(_) => {
                metrics::counter!(m::EVENTS_DROPPED, "reason" => "invalid").increment(1);
            }
        }
    }
}

/// Appends a page's events; the mark of its last event, where the next page starts.
fn write_page(
    out: &mut BytesMut,
    tracker: &mut Tracker,
    channel: &str,
    page: &Page,
    max_event_bytes: usize,
    presence: bool,
) -> Option<Mark> {
    let mut last = None;
    for e in &page.events {
        let mark = Mark {
            epoch: page.epoch.clone(),
            pos: e.pos,
        };
        write_stored(
            out,
            tracker,
            channel,
            &mark,
            &e.payload,
            max_event_bytes,
            presence,
        );
        last = Some(mark);
    }
    last
}

/// Pages of history still to write, one channel at a time.
pub struct Replayer {
    history: Arc<dyn History>,
    channels: Arc<[Arc<str>]>,
    todo: VecDeque<(usize, Mark)>,
    fetching: Option<(usize, BoxFuture<'static, Result<Page, HistoryError>>)>,
    max_event_bytes: usize,
    /// The stream asked for joins and leaves.
    presence: bool,
}

impl Replayer {
    /// Polls the next page and renders it (bytes, events); `None` when replay is complete.
    pub fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        tracker: &mut Tracker,
    ) -> Poll<Option<(Bytes, usize)>> {
        loop {
            if self.fetching.is_none() {
                let Some((idx, from)) = self.todo.pop_front() else {
                    return Poll::Ready(None);
                };
                let channel = self.channels[idx].to_string();
                self.fetching = Some((idx, self.history.after(channel, from, PAGE, PAGE_BYTES)));
            }
            let Some((idx, fut)) = self.fetching.as_mut() else {
                continue;
            };
            let idx = *idx;
            let page = match fut.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(page) => page,
            };
            self.fetching = None;
            let channel = self.channels[idx].clone();
            let page = match page {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(
                        "history read failed during replay: {e}; the stream gets gateway.gap"
                    );
                    self.todo.clear();
                    return Poll::Ready(Some((gap_frame("history_unavailable"), 0)));
                }
            };
            let mut out = BytesMut::new();
            let last = write_page(
                &mut out,
                tracker,
                &channel,
                &page,
                self.max_event_bytes,
                self.presence,
            );
            if page.more {
                if let Some(mark) = last {
                    self.todo.push_front((idx, mark));
                }
            }
            if !out.is_empty() {
                return Poll::Ready(Some((out.freeze(), page.events.len())));
            }
        }
    }
}

/// What a new stream starts with: its cursor, the first bytes after the prelude, and the rest
/// of the replay.
pub struct Resumed {
    /// The stream's cursor after the first pages.
    pub tracker: Tracker,
    /// `gateway.gap` (if any), the first page of each channel, and an `id:` line.
    pub first: Bytes,
    /// Later pages, if any.
    pub replayer: Option<Replayer>,
}

/// Works out where a stream starts. With `last_event_id`, the gap (if any) and the first page of
/// each channel's missed events; without, the current marks, sent as the first `id:`.
/// `presence`: the stream asked for joins and leaves (`?presence=1`).
pub async fn start(
    history: Arc<dyn History>,
    channels: &[String],
    last_event_id: Option<&str>,
    max_event_bytes: usize,
    presence: bool,
) -> Result<Resumed, HistoryError> {
    let now = history.marks(channels.to_vec()).await?;
    let names: Arc<[Arc<str>]> = channels.iter().map(|c| Arc::from(c.as_str())).collect();
    let mut marks: Vec<Mark> = now.clone();
    let mut gap_reason: Option<&str> = None;
    let mut from: Vec<Option<Mark>> = vec![None; channels.len()];
    if let Some(text) = last_event_id {
        match Cursor::decode(text, channels) {
            Err(_) => gap_reason = Some("unreadable_id"),
            Ok(known) => {
                for (i, mark) in known.into_iter().enumerate() {
                    match mark {
                        Some(m) => {
                            marks[i] = m.clone();
                            from[i] = Some(m);
                        }
                        None => gap_reason = Some("unknown_channel"),
                    }
                }
            }
        }
    }
    let mut tracker = Tracker::new(Cursor {
        marks: names.iter().cloned().zip(marks).collect(),
    });
    // Whether each channel's history still reaches back, before any event is written; the
    // events themselves come in bounded pages once the stream is open, so a handshake holds
    // no payload whatever its `Last-Event-ID` asks for.
    let mut pages = Vec::new();
    for (i, mark) in from.iter().enumerate() {
        if let Some(mark) = mark {
            let page = history
                .after(channels[i].clone(), mark.clone(), 0, PAGE_BYTES)
                .await?;
            if page.gap {
                gap_reason.get_or_insert("history_trimmed");
            }
            pages.push((i, page));
        }
    }
    let mut out = BytesMut::new();
    if let Some(reason) = gap_reason {
        out.extend_from_slice(&gap_frame(reason));
    }
    let mut todo = VecDeque::new();
    for (i, page) in pages {
        // Positions of another epoch are meaningless: start from the current history.
        if page.epoch != tracker.cursor.marks[i].1.epoch {
            tracker.cursor.marks[i].1 = Mark {
                epoch: page.epoch.clone(),
                pos: Default::default(),
            };
        }
        if page.more {
            todo.push_back((i, tracker.cursor.marks[i].1.clone()));
        }
    }
    out.extend_from_slice(&tracker.id_line(None));
    let replayer = (!todo.is_empty()).then(|| Replayer {
        history,
        channels: names,
        todo,
        fetching: None,
        max_event_bytes,
        presence,
    });
    Ok(Resumed {
        tracker,
        first: out.freeze(),
        replayer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::position::Position;

    fn mark(epoch: &str, ms: u64) -> Mark {
        Mark {
            epoch: epoch.into(),
            pos: Position { ms, seq: 0 },
        }
    }

    #[test]
    fn folding_drops_duplicates_and_sees_lost_history() {
        let mut t = Tracker::new(Cursor {
            marks: vec![("a".into(), mark("e1", 10)), ("b".into(), Mark::empty())],
        });
        assert_eq!(t.fold("a", &mark("e1", 10)), Fold::Duplicate);
        assert_eq!(t.fold("a", &mark("e1", 9)), Fold::Duplicate);
        assert_eq!(t.fold("a", &mark("e1", 11)), Fold::New { gap: false });
        assert_eq!(t.fold("b", &mark("e7", 1)), Fold::New { gap: false });
        assert_eq!(t.fold("a", &mark("e2", 1)), Fold::New { gap: true });
        assert_eq!(t.fold("zzz", &mark("e2", 1)), Fold::Duplicate);
    }
}
