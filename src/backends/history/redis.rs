//! History in Redis: one capped stream per channel, written only by the durable-publish function.
//!
//! Layout (hash tag on the channel, so a channel's keys share one Cluster slot):
//! - `{<prefix><channel>}:history` — STREAM, capped at `SSE_GATEWAY_HISTORY_SIZE` entries
//!   (field `p`: the payload), expiring `SSE_GATEWAY_HISTORY_TTL_SECS` after its last event;
//! - `{<prefix><channel>}:epoch` — STRING, the history's generation, same expiry;
//! - `{<prefix><channel>}:trimmed` — STRING, the newest position trimming removed;
//! - `{<prefix><channel>}:lost` — STRING, the newest position a failover lost (recorded by a
//!   replica that had delivered it live).
//!
//! Invariants: writes go through one Redis Function (`library.lua`), so `POST /publish` and a
//! publisher holding only `redis-cli` store and publish the same way, in one atomic step.
//! Replicas pass their settings with every call and never replace a newer library; the library
//! embeds the key that signs durable events on pub/sub. Reads are one script per channel
//! (`after.lua`).

use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::{BoxFuture, FutureExt};
use redis::{Script, Value};

use super::{History, HistoryError, HistorySettings, Page, Stored};
use crate::backends::redis::{deadline, value_text as text, Commands as Pool, Failure};
use crate::core::channel::MAX_CHANNEL_BYTES;
use crate::core::event::{MAX_EVENT_NAME_BYTES, PRESENCE_MARKER, RESERVED_PREFIX};
use crate::core::position::{DurableKey, Mark, Position, DURABLE_MARKER, NO_EPOCH};

/// The version of `library.lua`. Replicas never replace a library whose version is higher, so
/// an old replica restarting mid-rollout cannot take newer code away from newer replicas; each
/// version accepts every older caller's arguments.
pub const LIBRARY_VERSION: i64 = 3;

/// Where the key is agreed when no library holds one yet (one slot, `{gateway}`).
fn agreed_key_name(prefix: &str) -> String {
    format!("{prefix}{{gateway}}:durable-key")
}

/// The durable-publish library in Redis: loading it without downgrading, and the key it signs
/// durable events with.
#[derive(Clone)]
pub struct Library(Arc<LibraryInner>);

struct LibraryInner {
    pool: Pool,
    prefix: String,
    name: String,
    function: String,
    presence: String,
    info: String,
    defaults: (u64, u128, usize),
}

impl Library {
    /// The library for the configured prefix; `config`'s history settings become the defaults
    /// of publishers that call the function without them.
    pub fn new(pool: Pool, settings: &HistorySettings) -> Self {
        let prefix = settings.prefix.clone();
        let function = function_name(&prefix);
        Self(Arc::new(LibraryInner {
            pool,
            name: format!("sse_gateway_{function}"),
            info: format!("{function}_info"),
            presence: presence_function_name(&prefix),
            function,
            prefix,
            defaults: (
                settings.size.max(1),
                settings.ttl.as_millis(),
                settings.max_event_bytes,
            ),
        }))
    }

    fn source(&self, key: &DurableKey) -> String {
        self.source_as(LIBRARY_VERSION, key)
    }

    /// The library's source as a replica of `version` signing with `key` loads it: the Lua
    /// constants are generated from the Rust ones (settings, names, the durable marker and the
    /// naming rules), so the two sides cannot drift apart. Tests load other versions with it.
    pub fn source_as(&self, version: i64, key: &DurableKey) -> String {
        let l = &self.0;
        let constants = [
            ("VERSION", version.to_string()),
            ("KEY_HEX", lua_string(key.hex().as_bytes())),
            ("PREFIX", lua_string(l.prefix.as_bytes())),
            ("DEFAULT_MAXLEN", l.defaults.0.to_string()),
            ("DEFAULT_TTL_MS", l.defaults.1.to_string()),
            ("DEFAULT_MAX_BYTES", l.defaults.2.to_string()),
            (
                "PUBLISH",
                lua_string(l.pool.topology().publish_command().as_bytes()),
            ),
            ("FUNCTION", lua_string(l.function.as_bytes())),
            ("PRESENCE", lua_string(l.presence.as_bytes())),
            ("INFO", lua_string(l.info.as_bytes())),
            ("MARKER", lua_string(DURABLE_MARKER)),
            ("PRESENCE_MARKER", lua_string(PRESENCE_MARKER)),
            ("MAX_EVENT_NAME_BYTES", MAX_EVENT_NAME_BYTES.to_string()),
            ("RESERVED_PREFIX", lua_string(RESERVED_PREFIX.as_bytes())),
            ("MAX_CHANNEL_BYTES", MAX_CHANNEL_BYTES.to_string()),
        ];
        let mut out = format!("#!lua name={}\n", l.name);
        for (name, value) in constants {
            out.push_str(&format!("local {name} = {value}\n"));
        }
        out.push_str(include_str!("library.lua"));
        out
    }

    /// The presence function's name (`FCALL <it> 1 {<prefix><channel>} <op> …`).
    pub fn presence_function(&self) -> &str {
        &self.0.presence
    }

    /// The version and key of the library in place: `None` when there is none, or only one
    /// from before keys (it has no info function).
    pub async fn installed(&self) -> Result<Option<(i64, DurableKey)>, HistoryError> {
        let work = async {
            let mut conn = self.0.pool.get().await?;
            let listed: Value = redis::cmd("FUNCTION")
                .arg("LIST")
                .arg("LIBRARYNAME")
                .arg(&self.0.name)
                .query_async(&mut conn)
                .await
                .map_err(Failure::command("FUNCTION LIST"))?;
            if !mentions(&listed, &self.0.info) {
                return Ok(None);
            }
            let (version, hex): (i64, String) = redis::cmd("FCALL_RO")
                .arg(&self.0.info)
                .arg(0)
                .query_async(&mut conn)
                .await
                .map_err(Failure::command("reading the durable-publish library"))?;
            let key = DurableKey::from_hex(&hex)
                .ok_or_else(|| HistoryError::NoKey(format!("the library {}", self.0.name)))?;
            Ok(Some((version, key)))
        };
        deadline("reading the installed library", work).await
    }

    /// Makes sure a library of this version or newer is in place; the key it signs with.
    pub async fn ensure(&self) -> Result<DurableKey, HistoryError> {
        match self.installed().await? {
            Some((version, key)) if version >= LIBRARY_VERSION => return Ok(key),
            // An older library with a key: keep the key, bring the code up to date.
            Some((_, key)) => self.load(&key).await?,
            None => {
                let key = self.agreed_key().await?;
                self.load(&key).await?;
            }
        }
        // Read back what is in place: a replica loading at the same moment may have won.
        self.installed().await?.map(|(_, key)| key).ok_or_else(|| {
            HistoryError::NoKey(format!(
                "the library {} (missing right after loading it)",
                self.0.name
            ))
        })
    }

    /// One key for every replica that finds no library: the first `SET NX` wins.
    async fn agreed_key(&self) -> Result<DurableKey, HistoryError> {
        let work = async {
            let mut conn = self.0.pool.get().await?;
            let name = agreed_key_name(&self.0.prefix);
            let _: Value = redis::cmd("SET")
                .arg(&name)
                .arg(DurableKey::random().hex())
                .arg("NX")
                .query_async(&mut conn)
                .await
                .map_err(Failure::command("SET NX of the durable-event key"))?;
            let hex: String = redis::cmd("GET")
                .arg(&name)
                .query_async(&mut conn)
                .await
                .map_err(Failure::command("GET of the durable-event key"))?;
            DurableKey::from_hex(&hex).ok_or_else(|| HistoryError::NoKey(name.clone()))
        };
        deadline("agreeing on the durable-event key", work).await
    }

    async fn load(&self, key: &DurableKey) -> Result<(), HistoryError> {
        let source = self.source(key);
        let work = async {
            let mut conn = self.0.pool.get().await?;
            redis::cmd("FUNCTION")
                .arg("LOAD")
                .arg("REPLACE")
                .arg(&source)
                .query_async::<String>(&mut conn)
                .await
                .map_err(|e| Failure::command("FUNCTION LOAD")(e).into())
        };
        deadline("FUNCTION LOAD", work).await.map(|_| ())
    }
}

/// Whether a `FUNCTION LIST` reply names `function`.
fn mentions(v: &Value, function: &str) -> bool {
    match v {
        Value::BulkString(b) => b == function.as_bytes(),
        Value::SimpleString(s) => s == function,
        Value::Array(items) | Value::Set(items) => items.iter().any(|i| mentions(i, function)),
        Value::Map(pairs) => pairs
            .iter()
            .any(|(k, v)| mentions(k, function) || mentions(v, function)),
        _ => false,
    }
}

/// Redis-backed history (cheap to clone: one shared state).
#[derive(Clone)]
pub struct RedisHistory(Arc<Inner>);

struct Inner {
    pool: Pool,
    prefix: String,
    library: Library,
    /// This replica's settings, passed with every call (SPEC §6.6).
    maxlen: String,
    ttl_ms: String,
    max_bytes: String,
    after: Script,
    lost: Script,
}

/// The name of the durable-publish function for a channel prefix: `sse_publish` for `sse:`.
pub fn function_name(prefix: &str) -> String {
    let cleaned: String = prefix
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("{}_publish", cleaned.trim_matches('_'))
}

/// The name of the presence function beside it: `sse_presence` for `sse:`.
pub fn presence_function_name(prefix: &str) -> String {
    let publish = function_name(prefix);
    format!("{}_presence", publish.trim_end_matches("_publish"))
}

/// A Lua string literal holding exactly `bytes`: printable ASCII as is (but `'` and `\\`),
/// every other byte as a decimal escape.
fn lua_string(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() + 2);
    out.push('\'');
    for &b in bytes {
        match b {
            b'\'' | b'\\' => {
                out.push('\\');
                out.push(char::from(b));
            }
            b' '..=b'~' => out.push(char::from(b)),
            _ => out.push_str(&format!("\\{b:03}")),
        }
    }
    out.push('\'');
    out
}

/// A history script with the shared id helpers (`ids.lua`) in front of it.
fn script(name: &str, body: &str) -> String {
    format!("-- {name}\n{}{body}", include_str!("ids.lua"))
}

impl RedisHistory {
    /// History with the configured size, expiry and prefix.
    pub fn new(pool: Pool, settings: &HistorySettings) -> Self {
        Self(Arc::new(Inner {
            library: Library::new(pool.clone(), settings),
            pool,
            prefix: settings.prefix.clone(),
            maxlen: settings.size.to_string(),
            ttl_ms: settings.ttl.as_millis().to_string(),
            max_bytes: settings.max_event_bytes.to_string(),
            after: Script::new(&script("after.lua", include_str!("after.lua"))),
            lost: Script::new(&script("lost.lua", include_str!("lost.lua"))),
        }))
    }

    /// The durable-publish library (loaded on each connect, so a Redis that restarted empty
    /// has it again at once).
    pub fn library(&self) -> &Library {
        &self.0.library
    }

    /// The function publishers call: `FCALL <name> 1 {<prefix><channel>} <payload>`.
    pub fn function(&self) -> &str {
        &self.0.library.0.function
    }
}

impl Inner {
    fn key(&self, channel: &str, what: &str) -> String {
        format!("{{{}{channel}}}:{what}", self.prefix)
    }

    async fn fcall(&self, channel: &str, payload: &[u8]) -> Result<Mark, HistoryError> {
        let mut conn = self.pool.get().await?;
        let mut loaded_again = false;
        loop {
            let reply: Result<Vec<String>, _> = redis::cmd("FCALL")
                .arg(&self.library.0.function)
                .arg(1)
                .arg(format!("{{{}{channel}}}", self.prefix))
                .arg(payload)
                .arg(&self.maxlen)
                .arg(&self.ttl_ms)
                .arg(&self.max_bytes)
                .query_async(&mut conn)
                .await;
            match reply {
                Ok(v) if v.len() == 2 => {
                    let pos = Position::parse(&v[1]).ok_or_else(|| {
                        Failure::Reply(format!("stream id {:?} from the publish function", v[1]))
                    })?;
                    return Ok(Mark {
                        epoch: v[0].clone(),
                        pos,
                    });
                }
                Ok(_) => {
                    return Err(Failure::Reply(
                        "the publish function answered no [epoch, id]".into(),
                    )
                    .into())
                }
                Err(e) => {
                    let failure = Failure::command("FCALL of the publish function")(e);
                    if loaded_again || !failure.is_missing_function() {
                        return Err(failure.into());
                    }
                    // Redis restarted empty or flushed its functions: load ours, once.
                    drop(conn);
                    self.library.ensure().await?;
                    conn = self.pool.get().await?;
                    loaded_again = true;
                }
            }
        }
    }
}

impl History for RedisHistory {
    fn mark_lost(
        &self,
        channel: String,
        mark: Mark,
    ) -> BoxFuture<'static, Result<(), HistoryError>> {
        let this = self.0.clone();
        async move {
            let mut invocation = this.lost.key(this.key(&channel, "history"));
            invocation
                .key(this.key(&channel, "epoch"))
                .key(this.key(&channel, "lost"))
                .key(this.key(&channel, "trimmed"))
                .arg(&mark.epoch)
                .arg(mark.pos.to_string());
            let work = async {
                let mut conn = this.pool.get().await?;
                invocation
                    .invoke_async::<i64>(&mut conn)
                    .await
                    .map_err(Failure::command("recording a lost position"))
            };
            let recorded = deadline("recording a lost position", work).await?;
            if recorded == 1 {
                tracing::warn!(
                    channel,
                    position = %mark.pos,
                    "the channel's history lost durable events this replica had delivered (a failover to a replica that had not received them): older cursors now resume with gateway.gap"
                );
            }
            Ok(())
        }
        .boxed()
    }

    fn append(
        &self,
        channel: String,
        payload: Bytes,
    ) -> BoxFuture<'static, Result<Mark, HistoryError>> {
        let this = self.0.clone();
        async move { deadline("durable publish", this.fcall(&channel, &payload)).await }.boxed()
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
                let mut conn = this.pool.get().await?;
                let replies: Vec<Value> = pipe
                    .query_async(&mut conn)
                    .await
                    .map_err(Failure::command("reading history marks"))?;
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
            deadline("reading history marks", work).await
        }
        .boxed()
    }

    fn after(
        &self,
        channel: String,
        from: Mark,
        limit: usize,
        max_bytes: usize,
    ) -> BoxFuture<'static, Result<Page, HistoryError>> {
        let this = self.0.clone();
        async move {
            let work = async {
                let mut invocation = this.after.key(this.key(&channel, "history"));
                invocation
                    .key(this.key(&channel, "epoch"))
                    .key(this.key(&channel, "trimmed"))
                    .key(this.key(&channel, "lost"))
                    .arg(&from.epoch)
                    .arg(from.pos.to_string())
                    .arg(limit)
                    .arg(NO_EPOCH)
                    .arg(max_bytes);
                let mut conn = this.pool.get().await?;
                let reply: Vec<Value> = invocation
                    .invoke_async(&mut conn)
                    .await
                    .map_err(Failure::command("reading history"))?;
                let epoch = reply
                    .first()
                    .and_then(text)
                    .ok_or_else(|| Failure::Reply("history read without an epoch".into()))?;
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
                let more = matches!(reply.get(3), Some(Value::Int(1)));
                Ok(Page {
                    gap,
                    epoch,
                    events,
                    more,
                })
            };
            deadline("reading history", work).await
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lua_strings_hold_any_bytes() {
        assert_eq!(lua_string(b"sse:"), "'sse:'");
        assert_eq!(lua_string(b"\0D2\0"), "'\\000D2\\000'");
        assert_eq!(lua_string(b"a'b\\c\n"), "'a\\'b\\\\c\\010'");
    }

    #[test]
    fn function_names_follow_the_prefix() {
        assert_eq!(function_name("sse:"), "sse_publish");
        assert_eq!(function_name("app:events:"), "app_events_publish");
        assert_eq!(presence_function_name("sse:"), "sse_presence");
    }
}
