//! History in Redis: one capped stream per channel, written only by the durable-publish function.
//!
//! Layout (hash tag on the channel, so a channel's keys share one Cluster slot):
//! - `{<prefix><channel>}:history` — STREAM, capped at `SSE_GATEWAY_HISTORY_SIZE` entries
//!   (field `p`: the payload), expiring `SSE_GATEWAY_HISTORY_TTL_SECS` after its last event;
//! - `{<prefix><channel>}:epoch` — STRING, the history's generation, same expiry;
//! - `{<prefix><channel>}:trimmed` — STRING, the newest position trimming removed.
//!
//! Invariants: writes go through one Redis Function (`library.lua`), which every replica loads
//! with its settings, so `POST /publish` and a publisher holding only `redis-cli` store and
//! publish the same way, in one atomic step. Reads are one script per channel (`after.lua`).

use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::{BoxFuture, FutureExt};
use redis::{Script, Value};
use tokio::time::timeout;

use super::{History, HistoryError, Mark, Page, Position, Stored, NO_EPOCH};
use crate::backend::{Commands as Pool, COMMAND_TIMEOUT};
use crate::config::Config;

/// Redis-backed history (cheap to clone: one shared state).
#[derive(Clone)]
pub struct RedisHistory(Arc<Inner>);

struct Inner {
    pool: Pool,
    prefix: String,
    function: String,
    library: String,
    after: Script,
}

/// The name of the durable-publish function for a channel prefix: `sse_publish` for `sse:`.
pub fn function_name(prefix: &str) -> String {
    let cleaned: String = prefix
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("{}_publish", cleaned.trim_matches('_'))
}

fn err(e: impl std::fmt::Display) -> HistoryError {
    HistoryError(e.to_string())
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

impl RedisHistory {
    /// History with the configured size, expiry and prefix.
    pub fn new(pool: Pool, config: &Config) -> Self {
        Self(Arc::new(Inner::new(pool, config)))
    }

    /// Loads (or replaces) the durable-publish function; every replica does it on each connect,
    /// so a Redis that restarted empty has it again at once.
    pub async fn load_function(&self) -> Result<(), HistoryError> {
        self.0.load_function().await
    }

    /// The function publishers call: `FCALL <name> 1 {<prefix><channel>} <payload>`.
    pub fn function(&self) -> &str {
        &self.0.function
    }
}

impl Inner {
    fn new(pool: Pool, config: &Config) -> Self {
        let prefix = config.channel_prefix.clone();
        let function = function_name(&prefix);
        let escaped = prefix.replace('\\', "\\\\").replace('\'', "\\'");
        let library = include_str!("library.lua")
            .replace("__LIBRARY__", &format!("sse_gateway_{function}"))
            .replace("__FUNCTION__", &function)
            .replace("__PREFIX__", &escaped)
            .replace("__MAXLEN__", &config.history_size.to_string())
            .replace("__TTL_MS__", &config.history_ttl.as_millis().to_string())
            .replace("__MAX_BYTES__", &config.max_event_bytes.to_string())
            .replace("__PUBLISH__", pool.topology().publish_command());
        Self {
            pool,
            prefix,
            function,
            library,
            after: Script::new(include_str!("after.lua")),
        }
    }

    async fn load_function(&self) -> Result<(), HistoryError> {
        let work = async {
            let mut conn = self.pool.get().await.map_err(err)?;
            redis::cmd("FUNCTION")
                .arg("LOAD")
                .arg("REPLACE")
                .arg(&self.library)
                .query_async::<String>(&mut conn)
                .await
                .map_err(err)
        };
        timeout(COMMAND_TIMEOUT, work)
            .await
            .map_err(|_| err("FUNCTION LOAD timed out"))?
            .map(|_| ())
    }

    fn key(&self, channel: &str, what: &str) -> String {
        format!("{{{}{channel}}}:{what}", self.prefix)
    }

    async fn fcall(&self, channel: &str, payload: &[u8]) -> Result<Mark, HistoryError> {
        let mut conn = self.pool.get().await.map_err(err)?;
        let mut loaded_again = false;
        loop {
            let reply: Result<Vec<String>, _> = redis::cmd("FCALL")
                .arg(&self.function)
                .arg(1)
                .arg(format!("{{{}{channel}}}", self.prefix))
                .arg(payload)
                .query_async(&mut conn)
                .await;
            match reply {
                Ok(v) if v.len() == 2 => {
                    let pos = Position::parse(&v[1]).ok_or_else(|| err("bad stream id"))?;
                    return Ok(Mark {
                        epoch: v[0].clone(),
                        pos,
                    });
                }
                Ok(_) => return Err(err("unexpected reply from the publish function")),
                Err(e) if !loaded_again && e.to_string().contains("Function not found") => {
                    drop(conn);
                    self.load_function().await?;
                    conn = self.pool.get().await.map_err(err)?;
                    loaded_again = true;
                }
                Err(e) => return Err(err(e)),
            }
        }
    }
}

impl History for RedisHistory {
    fn append(
        &self,
        channel: String,
        payload: Bytes,
    ) -> BoxFuture<'static, Result<Mark, HistoryError>> {
        let this = self.0.clone();
        async move {
            timeout(COMMAND_TIMEOUT, this.fcall(&channel, &payload))
                .await
                .map_err(|_| err("durable publish timed out"))?
        }
        .boxed()
    }

    fn marks(&self, channels: Vec<String>) -> BoxFuture<'static, Result<Vec<Mark>, HistoryError>> {
        let this = self.0.clone();
        async move {
            let work = async {
                let mut pipe = redis::pipe();
                for ch in &channels {
                    pipe.cmd("GET").arg(this.key(ch, "epoch"));
                    pipe.cmd("XREVRANGE")
                        .arg(this.key(ch, "history"))
                        .arg("+")
                        .arg("-")
                        .arg("COUNT")
                        .arg(1);
                }
                let mut conn = this.pool.get().await.map_err(err)?;
                let replies: Vec<Value> = pipe.query_async(&mut conn).await.map_err(err)?;
                let mut marks = Vec::with_capacity(channels.len());
                for pair in replies.chunks(2) {
                    let epoch = pair.first().and_then(text);
                    let last = match pair.get(1) {
                        Some(Value::Array(entries)) => entries.first().and_then(|e| match e {
                            Value::Array(parts) => parts.first().and_then(text),
                            _ => None,
                        }),
                        _ => None,
                    };
                    marks.push(match epoch {
                        Some(epoch) => Mark {
                            epoch,
                            pos: last
                                .as_deref()
                                .and_then(Position::parse)
                                .unwrap_or_default(),
                        },
                        None => Mark::empty(),
                    });
                }
                Ok(marks)
            };
            timeout(COMMAND_TIMEOUT, work)
                .await
                .map_err(|_| err("reading history marks timed out"))?
        }
        .boxed()
    }

    fn after(
        &self,
        channel: String,
        from: Mark,
        limit: usize,
    ) -> BoxFuture<'static, Result<Page, HistoryError>> {
        let this = self.0.clone();
        async move {
            let work = async {
                let mut invocation = this.after.key(this.key(&channel, "history"));
                invocation
                    .key(this.key(&channel, "epoch"))
                    .key(this.key(&channel, "trimmed"))
                    .arg(&from.epoch)
                    .arg(from.pos.to_string())
                    .arg(limit)
                    .arg(NO_EPOCH);
                let mut conn = this.pool.get().await.map_err(err)?;
                let reply: Vec<Value> = invocation.invoke_async(&mut conn).await.map_err(err)?;
                let epoch = reply
                    .first()
                    .and_then(text)
                    .ok_or_else(|| err("bad history reply"))?;
                let gap = matches!(reply.get(1), Some(Value::Int(1)));
                let mut events = Vec::new();
                if let Some(Value::Array(entries)) = reply.get(2) {
                    for entry in entries {
                        let Value::Array(parts) = entry else { continue };
                        let Some(pos) = parts
                            .first()
                            .and_then(text)
                            .and_then(|s| Position::parse(&s))
                        else {
                            continue;
                        };
                        let payload = match parts.get(1) {
                            Some(Value::Array(fields)) => match fields.get(1) {
                                Some(Value::BulkString(b)) => Bytes::from(b.clone()),
                                _ => continue,
                            },
                            _ => continue,
                        };
                        events.push(Stored { pos, payload });
                    }
                }
                let more = events.len() > limit;
                events.truncate(limit);
                Ok(Page {
                    gap,
                    epoch,
                    events,
                    more,
                })
            };
            timeout(COMMAND_TIMEOUT, work)
                .await
                .map_err(|_| err("reading history timed out"))?
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn function_names_follow_the_prefix() {
        assert_eq!(function_name("sse:"), "sse_publish");
        assert_eq!(function_name("app:events:"), "app_events_publish");
    }
}
