//! The driver's side: publishing at a fixed rate through any of the systems' publish paths, and
//! reading the servers' CPU time and memory.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::net::{connect, mint_publisher, post, unix_nanos, wait_until, Signer};

/// How events enter the system under test.
#[derive(Clone, Debug)]
pub(crate) enum Via {
    /// `PUBLISH <prefix><channel> <payload>` on Redis: sse-gateway's raw path and the Python
    /// stack's only path.
    Redis { url: String, prefix: String },
    /// `FCALL sse_publish 1 {sse:<channel>} <payload>`: sse-gateway's durable path through Redis.
    Fcall { url: String },
    /// `POST /publish` on the gateway replicas (durable), failing over between them.
    Gateway {
        targets: Vec<SocketAddr>,
        signer: Signer,
    },
    /// `POST <path>?channel=<channel>` with the payload as the body: Nchan's publisher location.
    Nchan { addr: SocketAddr, path: String },
}

enum Conn {
    Redis(redis::aio::MultiplexedConnection),
    Http(Option<TcpStream>),
}

/// A connected publisher.
pub(crate) struct Publisher {
    via: Via,
    conn: Conn,
    token: String,
    target: usize,
    buf: Vec<u8>,
}

impl Publisher {
    pub(crate) async fn connect(via: Via) -> Result<Self, String> {
        let (conn, token) = match &via {
            Via::Redis { url, .. } | Via::Fcall { url } => {
                let client = redis::Client::open(url.as_str())
                    .map_err(|e| format!("--redis-url {url}: {e}"))?;
                let conn = client
                    .get_multiplexed_async_connection()
                    .await
                    .map_err(|e| format!("cannot reach Redis at {url}: {e}"))?;
                (Conn::Redis(conn), String::new())
            }
            Via::Gateway { signer, .. } => (Conn::Http(None), mint_publisher(signer)),
            Via::Nchan { .. } => (Conn::Http(None), String::new()),
        };
        Ok(Self {
            via,
            conn,
            token,
            target: 0,
            buf: Vec::new(),
        })
    }

    /// Publishes one payload; whether the system accepted it.
    pub(crate) async fn send(&mut self, channel: &str, payload: &str) -> bool {
        match (&self.via, &mut self.conn) {
            (Via::Redis { prefix, .. }, Conn::Redis(c)) => redis::cmd("PUBLISH")
                .arg(format!("{prefix}{channel}"))
                .arg(payload)
                .query_async::<i64>(c)
                .await
                .is_ok(),
            (Via::Fcall { .. }, Conn::Redis(c)) => redis::cmd("FCALL")
                .arg("sse_publish")
                .arg(1)
                .arg(format!("{{sse:{channel}}}"))
                .arg(payload)
                .query_async::<Vec<String>>(c)
                .await
                .is_ok(),
            (Via::Gateway { targets, .. }, Conn::Http(tcp)) => {
                let body = serde_json::json!({ "channel": channel, "data": payload }).to_string();
                let auth = format!("Bearer {}", self.token);
                let headers = [
                    ("Authorization", auth.as_str()),
                    ("Content-Type", "application/json"),
                ];
                // Try each replica once: a killed one must not stop the publisher.
                for _ in 0..targets.len() {
                    let addr = targets[self.target % targets.len()];
                    if tcp.is_none() {
                        *tcp = connect(addr, None).await.ok();
                    }
                    if let Some(t) = tcp.as_mut() {
                        let host = addr.to_string();
                        match post(t, &host, "/publish", &headers, &body, &mut self.buf).await {
                            Ok(202) => return true,
                            Ok(_) => return false,
                            Err(_) => {}
                        }
                    }
                    *tcp = None;
                    self.target += 1;
                }
                false
            }
            (Via::Nchan { addr, path }, Conn::Http(tcp)) => {
                if tcp.is_none() {
                    *tcp = connect(*addr, None).await.ok();
                }
                let Some(t) = tcp.as_mut() else {
                    return false;
                };
                let path = format!("{path}?channel={channel}");
                match post(t, &addr.to_string(), &path, &[], payload, &mut self.buf).await {
                    Ok(s) => (200..300).contains(&s),
                    Err(_) => {
                        *tcp = None;
                        false
                    }
                }
            }
            _ => false,
        }
    }
}

/// Publishes `events` events at `rate` per second, each stamped with its intended send time (so
/// a late publisher shows up as latency, not as a pause) and, when `numbered`, its sequence
/// number. `channel_of(i)` names the channel of event `i`; `at(i)` runs before event `i` (the
/// storm uses it to kill a replica). Returns how many were accepted.
pub(crate) async fn paced(
    publisher: &mut Publisher,
    events: u64,
    rate: u64,
    numbered: bool,
    mut channel_of: impl FnMut(u64) -> String,
    mut at: impl FnMut(u64),
) -> u64 {
    let interval = Duration::from_nanos(1_000_000_000 / rate.max(1));
    let start = tokio::time::Instant::now();
    let start_unix = unix_nanos();
    let mut accepted = 0;
    let mut seq = 0;
    for i in 0..events {
        let offset = interval * i as u32;
        wait_until(start, offset).await;
        at(i);
        let intended = start_unix + offset.as_nanos() as u64;
        let payload = if numbered {
            format!("{intended} {seq}")
        } else {
            intended.to_string()
        };
        if publisher.send(&channel_of(i), &payload).await {
            accepted += 1;
            seq += 1;
        } else if accepted == 0 && i == 0 {
            eprintln!("the first publish was refused: check --via and the publish address");
        }
    }
    accepted
}

/// The server processes to watch: by PID through `/proc` (any system), or by admin address
/// through sse-gateway's `/metrics`.
#[derive(Clone, Debug, Default)]
pub(crate) struct Servers {
    pub(crate) pids: Vec<u32>,
    pub(crate) admins: Vec<SocketAddr>,
}

impl Servers {
    /// Resident memory of every watched process together, in bytes.
    pub(crate) async fn rss(&self) -> Option<f64> {
        if !self.pids.is_empty() {
            let mut sum = 0.0;
            for pid in &self.pids {
                let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
                let kib: f64 = status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()?;
                sum += kib * 1024.0;
            }
            return Some(sum);
        }
        self.metric_sum("process_resident_memory_bytes").await
    }

    /// CPU time of every watched process together, in seconds.
    pub(crate) async fn cpu(&self) -> Option<f64> {
        if !self.pids.is_empty() {
            let mut ticks = 0u64;
            for pid in &self.pids {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
                // Fields after the command name (which may hold spaces): utime is the 12th.
                let rest = stat.rsplit_once(')')?.1;
                let f: Vec<&str> = rest.split_whitespace().collect();
                ticks += f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
            }
            // USER_HZ is 100 on every Linux this runs on.
            return Some(ticks as f64 / 100.0);
        }
        self.metric_sum("process_cpu_seconds_total").await
    }

    async fn metric_sum(&self, name: &str) -> Option<f64> {
        if self.admins.is_empty() {
            return None;
        }
        let mut sum = 0.0;
        for a in &self.admins {
            sum += crate::net::metric(*a, name).await?;
        }
        Some(sum)
    }
}
