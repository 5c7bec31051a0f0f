//! What an operator asks a replica: who is connected, on what, and why someone was refused.
//!
//! Invariants: served on the admin port only; nothing here ever holds or prints a token (the
//! gateway does not keep tokens past verification); refusal log lines are rate-limited, so a
//! flood of bad requests cannot fill the disk, and the last refusals stay visible in memory.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::core::hub::Hub;

/// Refusals kept for `GET /rejections`.
const KEEP: usize = 200;
/// Refusal log lines per second before they are summarised.
const LOG_PER_SECOND: u32 = 20;

fn unix_secs(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| (d.as_millis() as f64) / 1000.0)
}

/// One refused stream request.
#[derive(Debug, Clone)]
pub struct Rejection {
    /// When.
    pub at: SystemTime,
    /// The error code (`user_limit`, `unauthorized`, …).
    pub reason: &'static str,
    /// The HTTP status answered.
    pub status: u16,
    /// The token's `sub`, when the token was valid.
    pub sub: Option<String>,
    /// The client's address.
    pub remote: SocketAddr,
    /// What the client was told.
    pub message: String,
}

struct LogBudget {
    window: Instant,
    lines: u32,
    suppressed: u64,
}

/// The last refusals, and the rate limit of their log lines.
pub struct Rejections {
    recent: Mutex<VecDeque<Rejection>>,
    budget: Mutex<LogBudget>,
}

impl Default for Rejections {
    fn default() -> Self {
        Self {
            recent: Mutex::new(VecDeque::with_capacity(KEEP)),
            budget: Mutex::new(LogBudget {
                window: Instant::now(),
                lines: 0,
                suppressed: 0,
            }),
        }
    }
}

impl Rejections {
    /// Keeps a refusal and logs it, unless this second's log budget is spent.
    pub fn record(&self, replica: &str, r: Rejection) {
        let log = {
            let mut b = self.budget.lock().unwrap_or_else(|p| p.into_inner());
            if b.window.elapsed() >= Duration::from_secs(1) {
                if b.suppressed > 0 {
                    tracing::info!(
                        suppressed = b.suppressed,
                        replica,
                        "more stream refusals were not logged (at most {LOG_PER_SECOND} lines per second); see GET /rejections"
                    );
                }
                b.window = Instant::now();
                b.lines = 0;
                b.suppressed = 0;
            }
            if b.lines < LOG_PER_SECOND {
                b.lines += 1;
                true
            } else {
                b.suppressed += 1;
                false
            }
        };
        if log {
            tracing::info!(
                reason = r.reason,
                status = r.status,
                sub = r.sub.as_deref().unwrap_or("-"),
                remote = %r.remote,
                replica,
                "stream refused: {}",
                r.message
            );
        }
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() == KEEP {
            recent.pop_front();
        }
        recent.push_back(r);
    }

    /// `GET /rejections`: newest first.
    pub fn json(&self, replica: &str) -> Value {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let list: Vec<Value> = recent
            .iter()
            .rev()
            .map(|r| {
                json!({
                    "at": unix_secs(r.at),
                    "reason": r.reason,
                    "status": r.status,
                    "sub": r.sub,
                    "remote": r.remote.to_string(),
                    "message": r.message,
                })
            })
            .collect();
        json!({ "replica": replica, "rejections": list })
    }
}

/// Query parameters of the listing endpoints.
pub struct Filter {
    /// Only this `sub`.
    pub user: Option<String>,
    /// Only streams on this channel.
    pub channel: Option<String>,
    /// Page size (at most 1000).
    pub limit: usize,
    /// Items to skip.
    pub offset: usize,
}

impl Filter {
    /// Reads `user`, `channel`, `limit` (default 100) and `offset`.
    pub fn from_query(pairs: &[(String, String)]) -> Self {
        let get = |k: &str| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        Self {
            user: get("user"),
            channel: get("channel"),
            limit: get("limit")
                .and_then(|v| v.parse().ok())
                .unwrap_or(100usize)
                .min(1000),
            offset: get("offset").and_then(|v| v.parse().ok()).unwrap_or(0),
        }
    }
}

/// `GET /connections`: this replica's open streams, oldest first.
pub fn connections(hub: &Hub, replica: &str, filter: &Filter) -> Value {
    let mut streams = hub.streams();
    streams.retain(|s| {
        filter.user.as_ref().is_none_or(|u| &s.info.sub == u)
            && filter
                .channel
                .as_ref()
                .is_none_or(|c| s.info.channels.contains(c))
    });
    streams.sort_by_key(|s| s.id);
    let total = streams.len();
    let page: Vec<Value> = streams
        .iter()
        .skip(filter.offset)
        .take(filter.limit)
        .map(|s| {
            let (events, bytes) = s.written();
            json!({
                "connection": s.info.conn_id,
                "stream": s.id,
                "sub": s.info.sub,
                "channels": s.info.channels,
                "remote": s.info.remote.to_string(),
                "protocol": s.info.protocol,
                "opened_at": unix_secs(s.info.opened_at),
                "events_delivered": events,
                "bytes_sent": bytes,
                "queue_depth": s.queue_depth(),
            })
        })
        .collect();
    json!({ "replica": replica, "total": total, "offset": filter.offset, "connections": page })
}

/// `GET /channels`: channels this replica is subscribed to, with local subscriber counts.
pub fn channels(hub: &Hub, replica: &str, filter: &Filter) -> Value {
    let mut all = hub.channel_counts();
    if let Some(c) = &filter.channel {
        all.retain(|(name, _)| name == c);
    }
    all.sort();
    let total = all.len();
    let page: Vec<Value> = all
        .into_iter()
        .skip(filter.offset)
        .take(filter.limit)
        .map(|(channel, subscribers)| json!({ "channel": channel, "subscribers": subscribers }))
        .collect();
    json!({ "replica": replica, "total": total, "offset": filter.offset, "channels": page })
}
