//! `sse-gateway inspect`: the cluster-wide view an SRE needs when a user reports "no events" or
//! "too many connections", read from Redis (slots, replica registry) and, with `--details`, from
//! each replica's admin port.
//!
//! Invariants: read-only (it never changes Redis or a replica); it prints no token or secret
//! (none is stored anywhere it reads).

use std::collections::HashMap;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::backends::limits::redis::{admin_key, registry_key, slots_key};
use crate::backends::presence::redis::channel_key;

/// What to inspect.
pub struct Query {
    /// A user's slots and streams.
    pub user: Option<String>,
    /// A channel's subscribers.
    pub channel: Option<String>,
    /// Ask each replica for its connections too.
    pub details: bool,
    /// `SSE_GATEWAY_ADMIN_TOKEN`, sent to the replicas' admin ports.
    pub admin_token: Option<String>,
}

struct Replica {
    expiry_ms: i64,
    admin: Option<String>,
}

fn rfc3339(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn secs(ms: i64) -> String {
    format!("{:.1}s", ms as f64 / 1000.0)
}

/// GET on a replica's admin port (hyper's HTTP/1.1 client); the body, or why not.
async fn admin_get(addr: &str, path: &str, token: Option<&str>) -> Result<String, String> {
    let work = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| e.to_string())?;
        let mut request = http::Request::get(path).header(http::header::HOST, addr);
        if let Some(t) = token {
            request = request.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let request = request
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let exchange = async {
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| e.to_string())?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            if status != http::StatusCode::OK {
                return Err(format!("HTTP {status}"));
            }
            Ok(String::from_utf8_lossy(&body).into_owned())
        };
        // The connection is driven here, beside the exchange, and dropped with it.
        tokio::select! {
            answer = exchange => answer,
            ended = connection => Err(match ended {
                Ok(()) => "the connection closed before the answer".to_string(),
                Err(e) => e.to_string(),
            }),
        }
    };
    tokio::time::timeout(Duration::from_secs(2), work)
        .await
        .map_err(|_| "no answer within 2 s".to_string())?
}

fn encode_query(v: &str) -> String {
    form_urlencoded::byte_serialize(v.as_bytes()).collect()
}

async fn zrange_with_scores(
    conn: &mut crate::backends::redis::Conn,
    key: &str,
) -> Result<Vec<(String, f64)>, String> {
    redis::cmd("ZRANGE")
        .arg(key)
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query_async(conn)
        .await
        .map_err(|e| e.to_string())
}

/// Most members `inspect --channel` lists.
const MEMBERS_SHOWN: usize = 1000;

/// A presence channel's members as Redis holds them: users with their stream counts, leaves
/// pending, and entries per replica (with whether that replica's lease still holds).
async fn presence_report(
    conn: &mut crate::backends::redis::Conn,
    prefix: &str,
    channel: &str,
    replicas: &HashMap<String, Replica>,
    now_ms: i64,
) -> Result<String, String> {
    let key = |what| channel_key(prefix, channel, what);
    let users: Vec<(String, i64)> = redis::cmd("HGETALL")
        .arg(key("users"))
        .query_async(conn)
        .await
        .map_err(|e| e.to_string())?;
    let away = zrange_with_scores(conn, &key("away")).await?;
    let reps: Vec<(String, i64)> = redis::cmd("HGETALL")
        .arg(key("reps"))
        .query_async(conn)
        .await
        .map_err(|e| e.to_string())?;
    if users.is_empty() && away.is_empty() {
        return Ok(
            "  presence: no members (nobody is on it, or it is not a presence channel)\n".into(),
        );
    }
    let entries: i64 = users.iter().map(|(_, n)| n).sum();
    let mut out = format!(
        "  presence: {} user(s) with {entries} stream(s), {} leave(s) pending\n",
        users.len(),
        away.len()
    );
    for (id, n) in &reps {
        let state = match replicas.get(id) {
            Some(r) if r.expiry_ms > now_ms => "live".to_string(),
            Some(r) => format!(
                "lease EXPIRED {} ago: not counted, swept by a live replica",
                secs(now_ms - r.expiry_ms)
            ),
            None => "UNKNOWN to the registry: not counted".to_string(),
        };
        out.push_str(&format!("    replica {id}: {n} entr(ies), {state}\n"));
    }
    let mut members: Vec<(String, String)> = users
        .into_iter()
        .map(|(sub, n)| (sub, format!("{n} stream(s)")))
        .chain(away.into_iter().map(|(sub, due)| {
            let left = due as i64 - now_ms;
            (
                sub,
                format!(
                    "no stream; leave announced in {} unless back",
                    secs(left.max(0))
                ),
            )
        }))
        .collect();
    members.sort();
    let total = members.len();
    for (sub, what) in members.iter().take(MEMBERS_SHOWN) {
        out.push_str(&format!("    member {sub:?}: {what}\n"));
    }
    if total > MEMBERS_SHOWN {
        out.push_str(&format!("    … and {} more\n", total - MEMBERS_SHOWN));
    }
    Ok(out)
}

/// Runs the inspection and returns the report.
pub async fn run(redis_url: &str, prefix: &str, q: &Query) -> Result<String, String> {
    let topology = crate::backends::redis::Topology::parse(redis_url)
        .map_err(|e| format!("--redis-url: {e}"))?;
    let sharded = topology.sharded();
    let commands = crate::backends::redis::Commands::new(topology);
    let mut conn = crate::backends::redis::deadline("connecting to Redis", commands.get())
        .await
        .map_err(|e| format!("--redis-url: {e}"))?;
    let (now_s, now_us): (i64, i64) = redis::cmd("TIME")
        .query_async(&mut conn)
        .await
        .map_err(|e| e.to_string())?;
    let now_ms = now_s * 1000 + now_us / 1000;
    let registry = zrange_with_scores(&mut conn, &registry_key(prefix)).await?;
    let admins: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(admin_key(prefix))
        .query_async(&mut conn)
        .await
        .map_err(|e| e.to_string())?;
    let replicas: HashMap<String, Replica> = registry
        .into_iter()
        .map(|(id, expiry)| {
            let admin = admins.get(&id).cloned();
            (
                id,
                Replica {
                    expiry_ms: expiry as i64,
                    admin,
                },
            )
        })
        .collect();
    let live = replicas.values().filter(|r| r.expiry_ms > now_ms).count();
    let mut out = format!(
        "Redis {redis_url}, prefix {prefix:?}, at {} (Redis clock): {} replicas registered, {live} with a current lease\n",
        rfc3339(now_ms),
        replicas.len()
    );

    if let Some(user) = &q.user {
        let slots = zrange_with_scores(&mut conn, &slots_key(prefix, user)).await?;
        let mut by_replica: Vec<(String, Vec<(String, i64)>)> = Vec::new();
        for (member, admitted) in slots {
            let (replica, stream) = member.split_once(':').unwrap_or((member.as_str(), "?"));
            match by_replica.iter_mut().find(|(r, _)| r == replica) {
                Some((_, list)) => list.push((stream.to_string(), admitted as i64)),
                None => by_replica.push((
                    replica.to_string(),
                    vec![(stream.to_string(), admitted as i64)],
                )),
            }
        }
        let counted: usize = by_replica
            .iter()
            .filter(|(r, _)| replicas.get(r).is_some_and(|x| x.expiry_ms > now_ms))
            .map(|(_, l)| l.len())
            .sum();
        out.push_str(&format!(
            "\nuser {user:?}: {counted} slot(s) counted against the limit, {} recorded\n",
            by_replica.iter().map(|(_, l)| l.len()).sum::<usize>()
        ));
        if by_replica.is_empty() {
            out.push_str("  no slots: the user holds no stream on any replica\n");
        }
        for (replica_id, streams) in &by_replica {
            let reg = replicas.get(replica_id);
            let admin = reg.and_then(|r| r.admin.clone());
            let answering = match &admin {
                Some(a) => admin_get(a, "/healthz", None).await.is_ok(),
                None => false,
            };
            let state = match reg {
                None => "UNKNOWN to the registry (gone for over an hour): its slots no longer count".to_string(),
                Some(r) if r.expiry_ms <= now_ms => format!(
                    "lease EXPIRED {} ago: dead, its slots no longer count and go at the user's next connect",
                    secs(now_ms - r.expiry_ms)
                ),
                Some(r) if answering => format!("live, lease renewed, expires in {}", secs(r.expiry_ms - now_ms)),
                Some(r) => format!(
                    "NOT ANSWERING on its admin port: likely dead; its slots count until its lease expires in {}",
                    secs(r.expiry_ms - now_ms)
                ),
            };
            out.push_str(&format!(
                "  replica {replica_id} (admin {}): {state}\n",
                admin.as_deref().unwrap_or("unknown")
            ));
            for (stream, admitted) in streams {
                out.push_str(&format!(
                    "    stream {stream}: admitted {} ({} ago)\n",
                    rfc3339(*admitted),
                    secs(now_ms - admitted)
                ));
            }
            if q.details && answering {
                if let Some(a) = &admin {
                    match admin_get(
                        a,
                        &format!("/connections?user={}", encode_query(user)),
                        q.admin_token.as_deref(),
                    )
                    .await
                    {
                        Ok(body) => {
                            let v: serde_json::Value =
                                serde_json::from_str(&body).unwrap_or_default();
                            for c in v["connections"].as_array().into_iter().flatten() {
                                out.push_str(&format!(
                                    "    connection {} stream {}: channels {} from {} over {}, {} events / {} bytes sent, queue {}\n",
                                    c["connection"], c["stream"], c["channels"], c["remote"].as_str().unwrap_or("?"),
                                    c["protocol"].as_str().unwrap_or("?"), c["events_delivered"], c["bytes_sent"], c["queue_depth"]
                                ));
                            }
                        }
                        Err(e) => out.push_str(&format!("    (connections not available: {e})\n")),
                    }
                }
            }
        }
    }

    if let Some(channel) = &q.channel {
        let (_, numsub): (String, i64) = redis::cmd("PUBSUB")
            .arg(if sharded { "SHARDNUMSUB" } else { "NUMSUB" })
            .arg(format!("{prefix}{channel}"))
            .query_async(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        out.push_str(&format!(
            "\nchannel {channel:?}: {numsub} replica(s) subscribed to {prefix}{channel} (PUBSUB NUMSUB)\n"
        ));
        out.push_str(&presence_report(&mut conn, prefix, channel, &replicas, now_ms).await?);
        let mut ids: Vec<&String> = replicas.keys().collect();
        ids.sort();
        for id in ids {
            let r = &replicas[id];
            if r.expiry_ms <= now_ms {
                continue;
            }
            let Some(admin) = &r.admin else { continue };
            match admin_get(
                admin,
                &format!("/channels?channel={}", encode_query(channel)),
                q.admin_token.as_deref(),
            )
            .await
            {
                Ok(body) => {
                    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                    let n = v["channels"]
                        .as_array()
                        .and_then(|a| a.first())
                        .and_then(|c| c["subscribers"].as_u64())
                        .unwrap_or(0);
                    out.push_str(&format!(
                        "  replica {id} (admin {admin}): {n} local stream(s)\n"
                    ));
                }
                Err(e) => out.push_str(&format!(
                    "  replica {id} (admin {admin}): not answering ({e})\n"
                )),
            }
        }
    }
    Ok(out)
}
