//! History in memory, for single-replica mode: the same contract as Redis streams.
//!
//! Invariants: per channel a bounded deque of at most `size` events, an epoch that changes when
//! the history expires (`ttl` after the last event), and the highest trimmed position, so a cursor
//! older than what is kept is a gap. Appending hands the event to the sink after the lock is released.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::future::{self, BoxFuture, FutureExt};

use super::{History, HistoryError, HistorySettings, Page, Stored};
use crate::core::position::{Mark, Position, ANY_EPOCH, NO_EPOCH};
use crate::core::sink::EventSink;

struct Channel {
    epoch: String,
    events: VecDeque<Stored>,
    last: Position,
    max_deleted: Position,
    touched: Instant,
}

/// Single-replica history.
pub struct MemoryHistory {
    size: usize,
    ttl: Duration,
    sink: Arc<dyn EventSink>,
    channels: Mutex<HashMap<String, Channel>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl MemoryHistory {
    /// Keeps `size` events per channel for `ttl` after each channel's last event.
    pub fn new(settings: &HistorySettings, sink: Arc<dyn EventSink>) -> Arc<Self> {
        let history = Arc::new(Self {
            size: usize::try_from(settings.size.max(1)).unwrap_or(usize::MAX),
            ttl: settings.ttl,
            sink,
            channels: Mutex::new(HashMap::new()),
        });
        // Expired channels are dropped, so the map shrinks with the traffic.
        let weak = Arc::downgrade(&history);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                let Some(h) = weak.upgrade() else { return };
                let ttl = h.ttl;
                h.lock().retain(|_, c| c.touched.elapsed() < ttl);
            }
        });
        history
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Channel>> {
        self.channels.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn live<'a>(
        &self,
        map: &'a mut HashMap<String, Channel>,
        channel: &str,
    ) -> Option<&'a mut Channel> {
        if map
            .get(channel)
            .is_some_and(|c| c.touched.elapsed() >= self.ttl)
        {
            map.remove(channel);
        }
        map.get_mut(channel)
    }
}

impl History for MemoryHistory {
    fn append(
        &self,
        channel: String,
        payload: Bytes,
    ) -> BoxFuture<'static, Result<Mark, HistoryError>> {
        let mark = {
            let mut map = self.lock();
            if self.live(&mut map, &channel).is_none() {
                map.insert(
                    channel.clone(),
                    Channel {
                        epoch: format!("{:08x}", rand::random::<u32>() | 1),
                        events: VecDeque::new(),
                        last: Position::default(),
                        max_deleted: Position::default(),
                        touched: Instant::now(),
                    },
                );
            }
            let Some(c) = map.get_mut(&channel) else {
                return future::ready(Err(HistoryError::Vanished)).boxed();
            };
            let ms = now_ms().max(c.last.ms);
            let pos = if ms == c.last.ms {
                Position {
                    ms,
                    seq: c.last.seq + 1,
                }
            } else {
                Position { ms, seq: 0 }
            };
            c.last = pos;
            c.touched = Instant::now();
            c.events.push_back(Stored {
                pos,
                payload: payload.clone(),
            });
            while c.events.len() > self.size {
                if let Some(gone) = c.events.pop_front() {
                    c.max_deleted = gone.pos;
                }
            }
            Mark {
                epoch: c.epoch.clone(),
                pos,
            }
        };
        self.sink.durable(&channel, &mark, &payload);
        future::ready(Ok(mark)).boxed()
    }

    fn marks(&self, channels: Vec<String>) -> BoxFuture<'static, Result<Vec<Mark>, HistoryError>> {
        let mut map = self.lock();
        let marks = channels
            .iter()
            .map(|ch| match self.live(&mut map, ch) {
                Some(c) => Mark {
                    epoch: c.epoch.clone(),
                    pos: c.last,
                },
                None => Mark::empty(),
            })
            .collect();
        future::ready(Ok(marks)).boxed()
    }

    fn after(
        &self,
        channel: String,
        from: Mark,
        limit: usize,
        max_bytes: usize,
    ) -> BoxFuture<'static, Result<Page, HistoryError>> {
        let mut map = self.lock();
        let page = match self.live(&mut map, &channel) {
            None => Page {
                gap: from.epoch != NO_EPOCH && from.epoch != ANY_EPOCH,
                epoch: NO_EPOCH.to_string(),
                events: Vec::new(),
                more: false,
            },
            Some(c) => {
                let (gap, start) = if from.epoch == ANY_EPOCH {
                    (false, from.pos)
                } else if from.epoch == c.epoch && from.pos > c.last {
                    // A position this history never reached: an honest gap, from now.
                    (true, c.last)
                } else if from.epoch == c.epoch {
                    (c.max_deleted > from.pos, from.pos)
                } else if from.epoch == NO_EPOCH {
                    (c.max_deleted > Position::default(), Position::default())
                } else {
                    (true, Position::default())
                };
                let mut events: Vec<Stored> = Vec::new();
                let mut bytes = 0usize;
                let mut more = false;
                for e in c.events.iter().filter(|e| e.pos > start) {
                    let first = events.is_empty();
                    if events.len() == limit || (!first && bytes + e.payload.len() > max_bytes) {
                        more = true;
                        break;
                    }
                    bytes += e.payload.len();
                    events.push(e.clone());
                }
                Page {
                    gap,
                    epoch: c.epoch.clone(),
                    events,
                    more,
                }
            }
        };
        future::ready(Ok(page)).boxed()
    }
}
