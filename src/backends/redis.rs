//! How a replica reaches Redis: one server, a master found through Sentinel, or a cluster.
//!
//! `SSE_GATEWAY_REDIS_URL` picks the topology:
//! - `redis://host:port` or `rediss://…`: one server (or a proxy in front of one);
//! - `redis+sentinel://s1:26379,s2:26379/<master name>` (`rediss+sentinel://` for TLS to the
//!   Sentinels and the data nodes): the master Sentinel names, followed through failovers;
//! - `redis+cluster://n1:6379,n2:6379` (`rediss+cluster://`): a Redis Cluster, from seed nodes;
//!   events travel over sharded pub/sub (`SSUBSCRIBE`/`SPUBLISH`).
//!
//! Commands go through [`Commands`]: one multiplexed connection (a cluster connection in cluster
//! mode) shared by every task, so concurrent commands are pipelined onto the socket instead of
//! each checking a connection out of a pool (a pool's health check alone was two extra round
//! trips per admission). A connection that fails, times out or finds its server read-only (a
//! demoted master) is dropped, and the next command connects afresh (asking Sentinel again).

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Client, Cmd, Pipeline, RedisError, RedisFuture, Value};

/// Longest wait for one Redis command, connecting included, before it counts as failed; every
/// Redis user of a replica shares it.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for one connection. A cluster connection is made to every seed at once, and a
/// seed that stopped answering costs this much on each reconnect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a Redis operation failed: what an operator reads in the log line, and what a caller
/// may branch on (never the text of a message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// No connection could be made, or the topology names no master now.
    #[error("cannot reach Redis: {0}")]
    Unreachable(String),
    /// Redis did not answer within [`COMMAND_TIMEOUT`].
    #[error("{0} timed out (no answer within {COMMAND_TIMEOUT:?})")]
    TimedOut(&'static str),
    /// Redis answered with an error, or the connection broke during the command.
    #[error("{what} failed: {detail}")]
    Command {
        /// The operation, in an operator's words.
        what: &'static str,
        /// Redis's error code (`ERR`, `NOSCRIPT`, `READONLY`, …), when it answered one.
        code: Option<String>,
        /// The rest of the answer, or the I/O error.
        detail: String,
    },
    /// Redis answered something this gateway cannot read.
    #[error("unexpected Redis reply: {0}")]
    Reply(String),
    /// What a script depends on kept changing under it; the next attempt may pass.
    #[error("{0}")]
    Busy(&'static str),
}

impl Failure {
    /// Turns a client error during `what` into a failure.
    pub fn command(what: &'static str) -> impl FnOnce(RedisError) -> Failure {
        move |e| Failure::Command {
            what,
            code: e.code().map(str::to_string),
            detail: e.detail().map_or_else(|| e.to_string(), str::to_string),
        }
    }

    /// Whether Redis said the function called does not exist (a Redis that restarted empty
    /// or flushed its functions): the caller loads it and tries once more.
    pub fn is_missing_function(&self) -> bool {
        matches!(self, Failure::Command { code: Some(code), detail, .. }
            if code == "ERR" && detail.starts_with("Function not found"))
    }
}

/// A reply value as text (a bulk or simple string, or an integer), for reading script replies.
pub fn value_text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

/// A reply value as an integer: an integer reply, or a bulk string holding a number (Lua
/// numbers may come back as `"1.7e12"`-style text, which is truncated).
pub fn value_int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        Value::BulkString(b) => std::str::from_utf8(b)
            .ok()?
            .parse::<f64>()
            .ok()
            .map(|f| f as i64),
        _ => None,
    }
}

/// Runs one Redis operation (connecting included) under the one command deadline every Redis
/// user of a replica shares, so that no caller hangs on a server that stopped answering.
pub async fn deadline<T, E: From<Failure>>(
    what: &'static str,
    work: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, E> {
    match tokio::time::timeout(COMMAND_TIMEOUT, work).await {
        Ok(done) => done,
        Err(_) => Err(Failure::TimedOut(what).into()),
    }
}

const SCHEMES_HINT: &str = "must start with redis://, rediss://, redis+sentinel:// or \
     redis+cluster:// (examples: redis://127.0.0.1:6379/0, \
     redis+sentinel://s1:26379,s2:26379/mymaster, redis+cluster://n1:6379,n2:6379)";

/// Where Redis is, as `SSE_GATEWAY_REDIS_URL` says.
#[derive(Clone)]
pub enum Topology {
    /// One server.
    Single(Box<Client>),
    /// A master found through Sentinel.
    Sentinel(Arc<SentinelSource>),
    /// A Redis Cluster.
    Cluster(Arc<ClusterSource>),
}

/// The seed nodes of a cluster, and the command client built from them.
pub struct ClusterSource {
    seeds: Vec<String>,
    client: redis::cluster::ClusterClient,
}

/// The Sentinels and the master name to ask them for.
pub struct SentinelSource {
    client: tokio::sync::Mutex<redis::sentinel::SentinelClient>,
    /// The master name, for messages.
    pub master: String,
}

impl Topology {
    /// Reads `SSE_GATEWAY_REDIS_URL`; the error says what is wrong (without echoing the URL).
    pub fn parse(url: &str) -> Result<Self, String> {
        // Never the URL itself in a message: it may hold a password.
        let bad = |e: &dyn std::fmt::Display| e.to_string();
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(bad(&SCHEMES_HINT));
        };
        {
            let tls = scheme.starts_with("rediss");
            let base = if tls { "rediss" } else { "redis" };
            match scheme {
                "redis+sentinel" | "rediss+sentinel" => {
                    let (hosts, master) = rest.split_once('/').ok_or_else(|| {
                        bad(&"a Sentinel URL ends with /<master name>, e.g. redis+sentinel://s1:26379,s2:26379/mymaster")
                    })?;
                    let (auth, hosts) = split_auth(hosts);
                    let master = master.trim_end_matches('/');
                    if master.is_empty() || hosts.is_empty() {
                        return Err(bad(
                            &"give at least one Sentinel host:port and the master name",
                        ));
                    }
                    // With `rediss+sentinel` the Sentinels are spoken to over TLS too (a Sentinel
                    // answer names the master, so it must not be forgeable on the wire); the
                    // data nodes use the scheme's TLS and the URL's credentials.
                    let sentinels: Vec<String> =
                        hosts.split(',').map(|h| format!("{base}://{h}")).collect();
                    let node = node_info(&format!("{base}://{auth}127.0.0.1"), tls)
                        .map_err(|e| bad(&e))?;
                    let client = redis::sentinel::SentinelClient::build(
                        sentinels,
                        master,
                        Some(node),
                        redis::sentinel::SentinelServerType::Master,
                    )
                    .map_err(|e| bad(&e))?;
                    return Ok(Self::Sentinel(Arc::new(SentinelSource {
                        client: tokio::sync::Mutex::new(client),
                        master: master.to_string(),
                    })));
                }
                "redis+cluster" | "rediss+cluster" => {
                    let (auth, hosts) = split_auth(rest.trim_end_matches('/'));
                    let seeds: Vec<String> = hosts
                        .split(',')
                        .filter(|h| !h.is_empty())
                        .map(|h| format!("{base}://{auth}{h}/?protocol=resp3"))
                        .collect();
                    if seeds.is_empty() {
                        return Err(bad(&"give at least one seed node host:port"));
                    }
                    let client = cluster_builder(&seeds).build().map_err(|e| bad(&e))?;
                    return Ok(Self::Cluster(Arc::new(ClusterSource { seeds, client })));
                }
                "redis" | "rediss" => {}
                _ => return Err(bad(&SCHEMES_HINT)),
            }
        }
        Client::open(url)
            .map(|c| Self::Single(Box::new(c)))
            .map_err(|e| bad(&e))
    }

    /// Whether events travel over sharded pub/sub (`SPUBLISH`) rather than `PUBLISH`.
    pub fn sharded(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }

    /// The command events are published with: `SPUBLISH` on a cluster, else `PUBLISH`.
    pub fn publish_command(&self) -> &'static str {
        if self.sharded() {
            "SPUBLISH"
        } else {
            "PUBLISH"
        }
    }

    /// A client for the server that takes writes now (asks Sentinel each time); `None` for a
    /// cluster, which has no single such server.
    pub async fn master(&self) -> Result<Option<Client>, Failure> {
        match self {
            Self::Single(c) => Ok(Some((**c).clone())),
            Self::Sentinel(s) => s
                .client
                .lock()
                .await
                .async_get_client()
                .await
                .map(Some)
                .map_err(|e| {
                    Failure::Unreachable(format!(
                        "Sentinel does not name a reachable master {:?}: {e}",
                        s.master
                    ))
                }),
            Self::Cluster(_) => Ok(None),
        }
    }
}

fn cluster_builder(seeds: &[String]) -> redis::cluster::ClusterClientBuilder {
    redis::cluster::ClusterClientBuilder::new(seeds.to_vec())
        .use_protocol(redis::ProtocolVersion::RESP3)
        .connection_timeout(CONNECT_TIMEOUT)
        .response_timeout(COMMAND_TIMEOUT)
}

/// A cluster connection for sharded pub/sub, and the pushes (messages, and word of lost node
/// connections) it receives. A new one per session: the broker resubscribes itself, so that it
/// knows when a gap must be filled from history.
pub async fn sharded_pubsub(
    cluster: &ClusterSource,
) -> Result<
    (
        redis::cluster_async::ClusterConnection,
        tokio::sync::mpsc::UnboundedReceiver<redis::PushInfo>,
    ),
    Failure,
> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let client = cluster_builder(&cluster.seeds)
        .push_sender(tx)
        .build()
        .map_err(|e| Failure::Unreachable(e.to_string()))?;
    let conn = tokio::time::timeout(CONNECT_TIMEOUT * 3 / 2, client.get_async_connection())
        .await
        .map_err(|_| Failure::TimedOut("connecting to the Redis Cluster"))?
        .map_err(|e| Failure::Unreachable(format!("the Redis Cluster: {e}")))?;
    Ok((conn, rx))
}

/// The cluster hash slot of a key or shard channel (CRC16 of its hash tag, or of all of it).
pub fn slot(name: &[u8]) -> u16 {
    let tagged = name
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &name[open + 1..];
            let close = rest.iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(name);
    crc16::State::<crc16::XMODEM>::calculate(tagged) % 16384
}

/// `user:pass@hosts` → (`user:pass@`, `hosts`).
fn split_auth(s: &str) -> (&str, &str) {
    match s.rfind('@') {
        Some(at) => (&s[..=at], &s[at + 1..]),
        None => ("", s),
    }
}

fn node_info(
    url: &str,
    tls: bool,
) -> Result<redis::sentinel::SentinelNodeConnectionInfo, RedisError> {
    use redis::IntoConnectionInfo;
    let info = url.into_connection_info()?;
    let mut node = redis::sentinel::SentinelNodeConnectionInfo::default()
        .set_redis_connection_info(info.redis_settings().clone());
    if tls {
        node = node.set_tls_mode(redis::TlsMode::Secure);
    }
    Ok(node)
}

/// The shared command connection of a replica.
#[derive(Clone)]
pub struct Commands {
    topology: Topology,
    current: Arc<tokio::sync::Mutex<Current>>,
}

/// The connection in use, numbered so that a failure seen on an older one never drops a newer.
#[derive(Default)]
struct Current {
    generation: u64,
    shared: Option<Shared>,
}

#[derive(Clone)]
enum Shared {
    Plain(MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl Commands {
    /// Connects lazily: a replica starts (not ready) while Redis is down.
    pub fn new(topology: Topology) -> Self {
        Self {
            topology,
            current: Arc::new(tokio::sync::Mutex::new(Current::default())),
        }
    }

    /// The topology these commands go to.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// A handle on the shared connection, connecting if there is none.
    pub async fn get(&self) -> Result<Conn, Failure> {
        let mut current = self.current.lock().await;
        if let Some(shared) = current.shared.as_ref() {
            return Ok(Conn {
                shared: shared.clone(),
                generation: current.generation,
                owner: self.current.clone(),
            });
        }
        let shared = match &self.topology {
            Topology::Cluster(cluster) => Shared::Cluster(
                tokio::time::timeout(
                    CONNECT_TIMEOUT * 3 / 2,
                    cluster.client.get_async_connection(),
                )
                .await
                .map_err(|_| Failure::TimedOut("connecting to the Redis Cluster"))?
                .map_err(|e| Failure::Unreachable(format!("the Redis Cluster: {e}")))?,
            ),
            _ => {
                let client = self
                    .topology
                    .master()
                    .await?
                    .ok_or_else(|| Failure::Unreachable("no master to connect to".into()))?;
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(Some(COMMAND_TIMEOUT));
                Shared::Plain(
                    client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await
                        .map_err(|e| Failure::Unreachable(e.to_string()))?,
                )
            }
        };
        current.generation += 1;
        current.shared = Some(shared.clone());
        Ok(Conn {
            shared,
            generation: current.generation,
            owner: self.current.clone(),
        })
    }
}

/// One use of the shared connection; commands on it are pipelined with everyone else's.
pub struct Conn {
    shared: Shared,
    generation: u64,
    owner: Arc<tokio::sync::Mutex<Current>>,
}

impl Conn {
    /// Drops the shared connection after an error that says it is no longer any good, so the
    /// next command connects again (to whichever server is master by then).
    fn observe<T>(&self, result: &Result<T, RedisError>) {
        let Err(e) = result else { return };
        let broken = e.is_io_error()
            || e.is_connection_dropped()
            || e.is_timeout()
            || e.is_unrecoverable_error()
            || e.code() == Some("READONLY");
        // On a cluster too: a master that stopped answering stays in the connection's slot map
        // until something fails loudly, so a timeout must rebuild the map from the seeds.
        if broken {
            let generation = self.generation;
            let forget = move |current: &mut Current| {
                if current.generation == generation {
                    current.shared = None;
                }
            };
            match self.owner.try_lock() {
                Ok(mut current) => forget(&mut current),
                Err(_) => {
                    let owner = self.owner.clone();
                    tokio::spawn(async move { forget(&mut *owner.lock().await) });
                }
            }
        }
    }
}

/// Fails a command that has not been answered a little before the callers' own deadlines
/// (`COMMAND_TIMEOUT`), so that the failure is seen here and the connection replaced, rather
/// than the command being dropped by an outer timeout with the connection kept.
async fn within_deadline<T>(
    work: impl std::future::Future<Output = Result<T, RedisError>>,
) -> Result<T, RedisError> {
    match tokio::time::timeout(COMMAND_TIMEOUT - CONNECT_TIMEOUT, work).await {
        Ok(r) => r,
        Err(_) => Err(RedisError::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "Redis did not answer in time",
        ))),
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let work = async {
                match &mut self.shared {
                    Shared::Plain(c) => c.req_packed_command(cmd).await,
                    Shared::Cluster(c) => c.req_packed_command(cmd).await,
                }
            };
            let result = within_deadline(work).await;
            self.observe(&result);
            result
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let work = async {
                match &mut self.shared {
                    Shared::Plain(c) => c.req_packed_commands(cmd, offset, count).await,
                    Shared::Cluster(c) => c.req_packed_commands(cmd, offset, count).await,
                }
            };
            let result = within_deadline(work).await;
            self.observe(&result);
            result
        })
    }

    fn get_db(&self) -> i64 {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_topology_parses_and_bad_urls_say_why() {
        assert!(matches!(
            Topology::parse("redis://127.0.0.1:6379"),
            Ok(Topology::Single(_))
        ));
        assert!(matches!(
            Topology::parse("redis+sentinel://127.0.0.1:26379,127.0.0.1:26380/mymaster"),
            Ok(Topology::Sentinel(_))
        ));
        assert!(matches!(
            Topology::parse("redis+cluster://127.0.0.1:7000,127.0.0.1:7001"),
            Ok(Topology::Cluster(_))
        ));
        let e = Topology::parse("redis+sentinel://127.0.0.1:26379")
            .err()
            .unwrap_or_default();
        assert!(e.contains("master name"), "{e}");
        assert!(Topology::parse("redis+cluster://").is_err());
        // The slots Redis documents: the whole name, or the hash tag alone.
        assert_eq!(slot(b"123456789"), 12739);
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        assert_eq!(slot(b"{sse:orders}:history"), slot(b"sse:orders"));
        assert_eq!(slot(b"a{}b"), slot(b"a{}b"));
        assert!(Topology::parse("http://x").is_err());
    }
}
