//! Every setting of the process, parsed once at start-up.
//!
//! Invariants: each setting is a flag and an `SSE_GATEWAY_*` environment variable (the flag
//! wins); `--help` shows every default; `Cli::into_config` is the only place that judges
//! values, and the rest of the crate reads the typed [`Config`], never the environment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// The command line: the gateway's settings, plus optional helper subcommands.
#[derive(Debug, Parser)]
#[command(
    name = "sse-gateway",
    version,
    about = "Horizontally scaled Server-Sent Events gateway over Redis pub/sub"
)]
pub struct Cli {
    /// Settings shared by the server and the helper subcommands (which need the same key).
    #[command(flatten)]
    pub settings: Settings,
    /// Helper subcommand; none runs the gateway.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Helper subcommands for development and smoke tests.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print a signed token made with the configured key.
    Token(TokenArgs),
    /// Show where a user's streams are held, or which replicas serve a channel (reads Redis).
    Inspect(InspectArgs),
}

/// What `sse-gateway inspect` looks at.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A user (`sub`): its slots, on which replicas, and their leases.
    #[arg(long)]
    pub user: Option<String>,
    /// A channel: which replicas are subscribed, with their local stream counts.
    #[arg(long)]
    pub channel: Option<String>,
    /// Also ask each replica holding the user's slots for its connections.
    #[arg(long)]
    pub details: bool,
}

/// What `sse-gateway token` puts in the token it prints.
#[derive(Debug, Args)]
pub struct TokenArgs {
    /// The `sub` claim: the user the token speaks for.
    #[arg(long)]
    pub sub: Option<String>,
    /// A channel (or `prefix*`) the token may subscribe to; repeatable.
    #[arg(long = "channel")]
    pub channels: Vec<String>,
    /// A channel (or `prefix*`) the token may publish to; repeatable. Makes a publisher token.
    #[arg(long = "publish")]
    pub publish: Vec<String>,
    /// How long the token lives, e.g. `90s`, `15m`, `1h`, `7d`.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub ttl: Duration,
    /// PEM private key to sign with when the gateway is configured with a public key.
    #[arg(long)]
    pub private_key_file: Option<PathBuf>,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines, for terminals.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Raw settings as given on the command line or in the environment.
#[derive(Debug, Args)]
pub struct Settings {
    /// Client port: /events and /publish [default: 0.0.0.0:8080; 127.0.0.1:8080 in development
    /// mode, so a replica that lost its key is never reachable from outside by accident].
    #[arg(long, env = "SSE_GATEWAY_LISTEN")]
    pub listen: Option<String>,
    /// Operator port: /metrics, /healthz, /readyz (never TLS) [default: 0.0.0.0:9090;
    /// 127.0.0.1:9090 in development mode].
    #[arg(long, env = "SSE_GATEWAY_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,
    /// redis:// URL. Unset: single-replica mode with an in-process broker.
    #[arg(long, env = "SSE_GATEWAY_REDIS_URL")]
    pub redis_url: Option<String>,
    /// Prefix of every Redis pub/sub channel and key name.
    #[arg(long, env = "SSE_GATEWAY_CHANNEL_PREFIX", default_value = "sse:")]
    pub channel_prefix: String,
    /// HS256 secret for client and publisher tokens.
    #[arg(long, env = "SSE_GATEWAY_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// PEM public key file (RS256, ES256 or EdDSA, chosen by the key type).
    #[arg(long, env = "SSE_GATEWAY_JWT_PUBLIC_KEY_FILE")]
    pub jwt_public_key_file: Option<PathBuf>,
    /// URL of a JWKS document (`https://`, or `http://` on a trusted network): keys by `kid`.
    #[arg(long, env = "SSE_GATEWAY_JWT_JWKS_URL")]
    pub jwt_jwks_url: Option<String>,
    /// Required `iss` claim, checked when set.
    #[arg(long, env = "SSE_GATEWAY_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Required `aud` claim (string or array in the token), checked when set.
    #[arg(long, env = "SSE_GATEWAY_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Clock-skew allowance for `exp`/`nbf`, in seconds.
    #[arg(long, env = "SSE_GATEWAY_JWT_LEEWAY_SECS", default_value_t = 0)]
    pub jwt_leeway_secs: u64,
    /// Concurrent streams per JWT `sub`, across all replicas.
    #[arg(
        long,
        env = "SSE_GATEWAY_MAX_CONNECTIONS_PER_USER",
        default_value_t = 8
    )]
    pub max_connections_per_user: u32,
    /// Streams on this replica.
    #[arg(long, env = "SSE_GATEWAY_MAX_CONNECTIONS", default_value_t = 100_000)]
    pub max_connections: u64,
    /// A comment line is written after this many seconds without a write.
    #[arg(long, env = "SSE_GATEWAY_HEARTBEAT_SECS", default_value_t = 15)]
    pub heartbeat_secs: u64,
    /// `retry:` hint sent to clients, in milliseconds.
    #[arg(long, env = "SSE_GATEWAY_RETRY_MS", default_value_t = 3000)]
    pub retry_ms: u64,
    /// Events kept per channel for resume (0 = off).
    #[arg(long, env = "SSE_GATEWAY_HISTORY_SIZE", default_value_t = 1000)]
    pub history_size: u64,
    /// How long a channel's history lives after its last event, in seconds.
    #[arg(long, env = "SSE_GATEWAY_HISTORY_TTL_SECS", default_value_t = 600)]
    pub history_ttl_secs: u64,
    /// Graceful shutdown window, in seconds: stream closes are spread over it.
    #[arg(long, env = "SSE_GATEWAY_DRAIN_SECS", default_value_t = 30)]
    pub drain_secs: u64,
    /// How soon a dead replica's per-user slots are freed, in seconds.
    #[arg(long, env = "SSE_GATEWAY_CONNECTION_LEASE_SECS", default_value_t = 30)]
    pub connection_lease_secs: u64,
    /// Largest publisher payload accepted, in bytes.
    #[arg(long, env = "SSE_GATEWAY_MAX_EVENT_BYTES", default_value_t = 65536)]
    pub max_event_bytes: usize,
    /// Origins allowed to open streams from a browser: `*` or a comma-separated list.
    #[arg(long, env = "SSE_GATEWAY_CORS_ORIGINS")]
    pub cors_origins: Option<String>,
    /// Name of a cookie that may carry the token (after `Authorization`, before
    /// `?access_token=`), so browsers keep tokens out of URLs and refresh them without code.
    #[arg(long, env = "SSE_GATEWAY_AUTH_COOKIE")]
    pub auth_cookie: Option<String>,
    /// `false`: `?access_token=` is refused (400), so tokens never sit in URLs or proxy logs.
    #[arg(long, env = "SSE_GATEWAY_QUERY_TOKEN", default_value_t = true, action = clap::ArgAction::Set)]
    pub query_token: bool,
    /// PEM certificate chain for TLS on the client port.
    #[arg(long, env = "SSE_GATEWAY_TLS_CERT_FILE")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key for TLS on the client port.
    #[arg(long, env = "SSE_GATEWAY_TLS_KEY_FILE")]
    pub tls_key_file: Option<PathBuf>,
    /// Frames a stream may have waiting before its client counts as too slow and is cut off.
    #[arg(long, env = "SSE_GATEWAY_CLIENT_QUEUE", default_value_t = 1024)]
    pub client_queue: usize,
    /// Seconds before `exp` to send `gateway.token-expiring` (0 = off).
    #[arg(
        long,
        env = "SSE_GATEWAY_TOKEN_EXPIRY_WARNING_SECS",
        default_value_t = 0
    )]
    pub token_expiry_warning_secs: u64,
    /// Close streams after about this many seconds (jittered -10%), so that clients rebalance
    /// onto replicas added by a scale-up (0 = off).
    #[arg(long, env = "SSE_GATEWAY_MAX_STREAM_SECS", default_value_t = 0)]
    pub max_stream_secs: u64,
    /// Seconds a client has to send its request headers (slow-header attacks).
    #[arg(long, env = "SSE_GATEWAY_HEADER_TIMEOUT_SECS", default_value_t = 10)]
    pub header_timeout_secs: u64,
    /// Seconds a stream's socket may take no bytes before it is cut as a slow consumer; also
    /// the socket's TCP_USER_TIMEOUT, so a client that vanished silently is noticed.
    #[arg(long, env = "SSE_GATEWAY_WRITE_TIMEOUT_SECS", default_value_t = 30)]
    pub write_timeout_secs: u64,
    /// Stream and publish requests being authenticated at once; more get 503 `capacity`.
    #[arg(
        long,
        env = "SSE_GATEWAY_MAX_PENDING_HANDSHAKES",
        default_value_t = 1024
    )]
    pub max_pending_handshakes: usize,
    /// Channels whose members are tracked (`GET /presence`, `gateway.join`/`gateway.leave`):
    /// comma-separated names or `prefix*` patterns.
    #[arg(long, env = "SSE_GATEWAY_PRESENCE_CHANNELS")]
    pub presence_channels: Option<String>,
    /// A user's `gateway.leave` is announced only if they have not come back within this long.
    #[arg(
        long,
        env = "SSE_GATEWAY_PRESENCE_LEAVE_GRACE_SECS",
        default_value_t = 5
    )]
    pub presence_leave_grace_secs: u64,
    /// Seconds between checks that the Redis subscription still delivers.
    #[arg(long, env = "SSE_GATEWAY_REDIS_PROBE_SECS", default_value_t = 5)]
    pub redis_probe_secs: u64,
    /// `host:port` where other replicas and `inspect` reach this replica's admin port
    /// (Kubernetes: the pod IP) [default: the admin listen address, or this host's first
    /// non-loopback address with its port when that is unspecified].
    #[arg(long, env = "SSE_GATEWAY_ADMIN_ADVERTISE")]
    pub admin_advertise: Option<String>,
    /// Bearer token that `/connections`, `/channels` and `/rejections` require (they name users,
    /// channels and client addresses); `/metrics`, `/healthz`, `/readyz` never need it.
    #[arg(long, env = "SSE_GATEWAY_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Set by Kubernetes in every pod: a replica there never starts in development mode.
    #[arg(long, env = "KUBERNETES_SERVICE_HOST", hide = true)]
    pub kubernetes_service_host: Option<String>,
    /// Log line format.
    #[arg(
        long,
        env = "SSE_GATEWAY_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
    /// Log filter (tracing's env-filter syntax), e.g. `info` or `sse_gateway=debug`.
    #[arg(long, env = "SSE_GATEWAY_LOG", default_value = "info")]
    pub log: String,
}

/// The key tokens are checked with, as configured.
#[derive(Clone)]
pub enum JwtKey {
    /// HS256 shared secret.
    Secret(Vec<u8>),
    /// PEM public key; the algorithm follows from its type.
    PublicKeyPem(Vec<u8>),
    /// A JWKS document's URL: keys chosen by the token's `kid`, fetched and refreshed.
    Jwks(String),
    /// No key configured and no Redis: development mode with a random secret.
    Development(Vec<u8>),
}

impl std::fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material, whatever the log level.
        match self {
            JwtKey::Secret(_) => f.write_str("JwtKey::Secret(..)"),
            JwtKey::PublicKeyPem(_) => f.write_str("JwtKey::PublicKeyPem(..)"),
            JwtKey::Jwks(url) => write!(f, "JwtKey::Jwks({url})"),
            JwtKey::Development(_) => f.write_str("JwtKey::Development(..)"),
        }
    }
}

/// The admin port's bearer token; never printed, compared in constant time.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(String);

impl AdminToken {
    /// Whether an `Authorization` header value carries this token.
    pub fn admits(&self, authorization: Option<&[u8]>) -> bool {
        let Some(given) = authorization.and_then(|v| v.strip_prefix(b"Bearer ")) else {
            return false;
        };
        let want = self.0.as_bytes();
        // Constant time in the token's bytes: a length mismatch still walks the whole input.
        let mut diff = u8::from(given.len() != want.len());
        for (i, b) in given.iter().enumerate() {
            diff |= b ^ want.get(i).copied().unwrap_or(0);
        }
        diff == 0
    }

    /// The value to send in `Authorization: Bearer …` (for `inspect`).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(..)")
    }
}

impl AdminToken {
    /// Reads the setting; an empty value is no token.
    pub fn from_setting(value: Option<&str>) -> Option<Self> {
        value.filter(|v| !v.is_empty()).map(|v| Self(v.to_string()))
    }
}

/// Which origins may open streams from a browser.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CorsOrigins {
    /// Any origin (never with credentials).
    Any,
    /// Exactly these origins.
    List(Vec<String>),
}

/// Validated settings; what the rest of the crate reads.
#[derive(Debug, Clone)]
pub struct Config {
    /// Client listen address.
    pub listen: SocketAddr,
    /// Admin listen address.
    pub admin_listen: SocketAddr,
    /// Redis URL; `None` is single-replica mode.
    pub redis_url: Option<String>,
    /// Prefix of Redis names.
    pub channel_prefix: String,
    /// Token key.
    pub jwt_key: JwtKey,
    /// Required issuer.
    pub jwt_issuer: Option<String>,
    /// Required audience.
    pub jwt_audience: Option<String>,
    /// Clock-skew allowance.
    pub jwt_leeway: Duration,
    /// Per-user stream limit.
    pub max_connections_per_user: u32,
    /// Per-replica stream limit.
    pub max_connections: u64,
    /// Idle time before a heartbeat comment.
    pub heartbeat: Duration,
    /// `retry:` hint in milliseconds.
    pub retry_ms: u64,
    /// Events kept per channel.
    pub history_size: u64,
    /// History lifetime after the last event.
    pub history_ttl: Duration,
    /// Drain window.
    pub drain: Duration,
    /// Per-user slot lease.
    pub connection_lease: Duration,
    /// Largest accepted payload.
    pub max_event_bytes: usize,
    /// Browser origins allowed.
    pub cors_origins: Option<CorsOrigins>,
    /// The cookie that may carry the token.
    pub auth_cookie: Option<String>,
    /// Whether `?access_token=` is accepted.
    pub query_token: bool,
    /// TLS certificate and key files.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Per-stream queue length.
    pub client_queue: usize,
    /// Interval of the pub/sub liveness probe.
    pub redis_probe: Duration,
    /// Warning before token expiry (zero = off).
    pub token_expiry_warning: Duration,
    /// Maximum stream age (zero = off).
    pub max_stream_age: Duration,
    /// Time allowed for request headers.
    pub header_timeout: Duration,
    /// Longest time a stream's socket may take no bytes.
    pub write_timeout: Duration,
    /// Token the admin port's listings require.
    pub admin_token: Option<AdminToken>,
    /// Where others reach the admin port, when set.
    pub admin_advertise: Option<String>,
    /// Concurrent handshakes allowed.
    pub max_pending_handshakes: usize,
    /// Channel names and `prefix*` patterns whose members are tracked (empty: presence off).
    pub presence_channels: Vec<String>,
    /// How long a user may be gone before their leave is announced.
    pub presence_leave_grace: Duration,
}

impl Config {
    /// Whether `channel`'s members are tracked.
    pub fn is_presence_channel(&self, channel: &str) -> bool {
        crate::core::channel::granted(&self.presence_channels, channel)
    }
}

/// Reads `SSE_GATEWAY_PRESENCE_CHANNELS`: channel names, or prefixes ending in one `*`.
fn presence_channels(setting: Option<&str>, history_size: u64) -> Result<Vec<String>, ConfigError> {
    let mut out = Vec::new();
    for item in setting.unwrap_or("").split(',').map(str::trim) {
        if item.is_empty() {
            continue;
        }
        let name = item.strip_suffix('*').unwrap_or(item);
        let valid = if name.is_empty() && item == "*" {
            true
        } else {
            crate::core::channel::validate_name(name).is_ok()
        };
        if !valid {
            return Err(bad(
                "SSE_GATEWAY_PRESENCE_CHANNELS",
                format!("{item:?} is neither a channel name nor a prefix ending in *: list names like room:lobby or prefixes like room:*, separated by commas"),
            ));
        }
        out.push(item.to_string());
    }
    if !out.is_empty() && history_size == 0 {
        return Err(bad(
            "SSE_GATEWAY_PRESENCE_CHANNELS",
            "joins and leaves are durable events, so presence needs history: set SSE_GATEWAY_HISTORY_SIZE above 0 or unset SSE_GATEWAY_PRESENCE_CHANNELS",
        ));
    }
    Ok(out)
}

impl CorsOrigins {
    /// Reads `SSE_GATEWAY_CORS_ORIGINS`: unset or empty is none, `*` is any, else a comma list
    /// of `http(s)://` origins (a trailing `/` is dropped).
    pub fn parse(setting: Option<&str>) -> Result<Option<Self>, ConfigError> {
        match setting.map(str::trim) {
            None | Some("") => Ok(None),
            Some("*") => Ok(Some(CorsOrigins::Any)),
            Some(list) => {
                let origins: Vec<String> = list
                    .split(',')
                    .map(|o| o.trim().trim_end_matches('/').to_string())
                    .filter(|o| !o.is_empty())
                    .collect();
                if let Some(o) = origins
                    .iter()
                    .find(|o| !(o.starts_with("http://") || o.starts_with("https://")))
                {
                    return Err(bad(
                        "SSE_GATEWAY_CORS_ORIGINS",
                        format!("{o:?} is not an origin like https://app.example.com (or use *)"),
                    ));
                }
                Ok(Some(CorsOrigins::List(origins)))
            }
        }
    }
}

/// A setting that cannot be used, named the way the operator wrote it.
#[derive(Debug)]
pub struct ConfigError {
    /// Environment variable of the setting.
    pub setting: &'static str,
    /// What is wrong and what to do.
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid {}: {}", self.setting, self.message)
    }
}

impl std::error::Error for ConfigError {}

fn bad(setting: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        setting,
        message: message.into(),
    }
}

fn parse_addr(setting: &'static str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|_| {
        bad(
            setting,
            format!("{value:?} is not an IP:port address (example: 0.0.0.0:8080)"),
        )
    })
}

fn positive(setting: &'static str, value: u64) -> Result<u64, ConfigError> {
    if value == 0 {
        Err(bad(setting, "must be at least 1"))
    } else {
        Ok(value)
    }
}

/// A duration setting in whole seconds, within `min..=max` (huge values would overflow the
/// clock arithmetic of timers and leases).
fn secs(setting: &'static str, value: u64, min: u64, max: u64) -> Result<Duration, ConfigError> {
    if (min..=max).contains(&value) {
        Ok(Duration::from_secs(value))
    } else {
        Err(bad(
            setting,
            format!("{value} is out of range: use {min} to {max} seconds"),
        ))
    }
}

const HOUR: u64 = 3600;
const DAY: u64 = 24 * HOUR;

impl Settings {
    /// Judges every value and builds the typed configuration.
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let redis_url = match self.redis_url.filter(|u| !u.trim().is_empty()) {
            None => None,
            Some(url) => Some(validate_redis_url(url)?),
        };
        if self.channel_prefix.is_empty()
            || self
                .channel_prefix
                .bytes()
                .any(|b| !(b'!'..=b'~').contains(&b) || b == b'{' || b == b'}')
        {
            return Err(bad(
                "SSE_GATEWAY_CHANNEL_PREFIX",
                "must be 1 or more printable ASCII characters without spaces or braces (default sse:)",
            ));
        }
        let jwks = self.jwt_jwks_url.filter(|u| !u.is_empty());
        if jwks.is_some() && (self.jwt_secret.is_some() || self.jwt_public_key_file.is_some()) {
            return Err(bad(
                "SSE_GATEWAY_JWT_JWKS_URL",
                "is set together with SSE_GATEWAY_JWT_SECRET or SSE_GATEWAY_JWT_PUBLIC_KEY_FILE; keep one key source",
            ));
        }
        let jwt_key = match (self.jwt_secret, self.jwt_public_key_file) {
            _ if jwks.is_some() => {
                let url = jwks.unwrap_or_default();
                let ok = url.parse::<http::Uri>().ok().filter(|u| {
                    matches!(u.scheme_str(), Some("https" | "http")) && u.host().is_some()
                });
                if ok.is_none() {
                    return Err(bad(
                        "SSE_GATEWAY_JWT_JWKS_URL",
                        "must be an https:// (or http://) URL, e.g. https://auth.example.com/.well-known/jwks.json",
                    ));
                }
                JwtKey::Jwks(url)
            }
            (Some(_), Some(_)) => return Err(bad(
                "SSE_GATEWAY_JWT_SECRET",
                "both SSE_GATEWAY_JWT_SECRET and SSE_GATEWAY_JWT_PUBLIC_KEY_FILE are set; keep one",
            )),
            (Some(secret), None) => {
                if secret.len() < 16 {
                    return Err(bad(
                        "SSE_GATEWAY_JWT_SECRET",
                        "is shorter than 16 bytes; use a long random secret (e.g. openssl rand -hex 32)",
                    ));
                }
                JwtKey::Secret(secret.into_bytes())
            }
            (None, Some(path)) => {
                let pem = std::fs::read(&path).map_err(|e| {
                    bad(
                        "SSE_GATEWAY_JWT_PUBLIC_KEY_FILE",
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                decoding_key_for_pem(&pem).map_err(|e| {
                    bad(
                        "SSE_GATEWAY_JWT_PUBLIC_KEY_FILE",
                        format!("{}: {e}", path.display()),
                    )
                })?;
                JwtKey::PublicKeyPem(pem)
            }
            (None, None) => {
                if redis_url.is_some() {
                    return Err(bad(
                        "SSE_GATEWAY_JWT_SECRET",
                        "no token key is set and SSE_GATEWAY_REDIS_URL is; replicas need a shared key: \
                         set SSE_GATEWAY_JWT_SECRET or SSE_GATEWAY_JWT_PUBLIC_KEY_FILE",
                    ));
                }
                if self.kubernetes_service_host.is_some() {
                    return Err(bad(
                        "SSE_GATEWAY_JWT_SECRET",
                        "no token key is set and this runs in Kubernetes (KUBERNETES_SERVICE_HOST); \
                         development mode is refused there: check the Secret that should set \
                         SSE_GATEWAY_JWT_SECRET or SSE_GATEWAY_JWT_PUBLIC_KEY_FILE",
                    ));
                }
                JwtKey::Development(random_secret())
            }
        };
        // Development mode listens on loopback unless told otherwise.
        let host = if matches!(jwt_key, JwtKey::Development(_)) {
            "127.0.0.1"
        } else {
            "0.0.0.0"
        };
        let listen = parse_addr(
            "SSE_GATEWAY_LISTEN",
            self.listen.as_deref().unwrap_or(&format!("{host}:8080")),
        )?;
        let admin_listen = parse_addr(
            "SSE_GATEWAY_ADMIN_LISTEN",
            self.admin_listen
                .as_deref()
                .unwrap_or(&format!("{host}:9090")),
        )?;
        if listen == admin_listen && listen.port() != 0 {
            return Err(bad(
                "SSE_GATEWAY_ADMIN_LISTEN",
                format!("{admin_listen} is also the client address; give the admin port its own"),
            ));
        }
        let heartbeat = secs("SSE_GATEWAY_HEARTBEAT_SECS", self.heartbeat_secs, 1, HOUR)?;
        let max_connections = positive("SSE_GATEWAY_MAX_CONNECTIONS", self.max_connections)?;
        let per_user = positive(
            "SSE_GATEWAY_MAX_CONNECTIONS_PER_USER",
            u64::from(self.max_connections_per_user),
        )?;
        let lease = secs(
            "SSE_GATEWAY_CONNECTION_LEASE_SECS",
            self.connection_lease_secs,
            1,
            HOUR,
        )?;
        let probe = secs(
            "SSE_GATEWAY_REDIS_PROBE_SECS",
            self.redis_probe_secs,
            1,
            HOUR,
        )?;
        if self.retry_ms > DAY * 1000 {
            return Err(bad(
                "SSE_GATEWAY_RETRY_MS",
                format!(
                    "{} is out of range: use 0 to {} ms",
                    self.retry_ms,
                    DAY * 1000
                ),
            ));
        }
        if self.history_size > 100_000_000 {
            return Err(bad(
                "SSE_GATEWAY_HISTORY_SIZE",
                "is out of range: use 0 to 100000000 events",
            ));
        }
        if self.max_event_bytes < 16 || self.max_event_bytes > 64 * 1024 * 1024 {
            return Err(bad(
                "SSE_GATEWAY_MAX_EVENT_BYTES",
                "must be between 16 and 67108864 bytes",
            ));
        }
        if self.client_queue < 8 || self.client_queue > 1_000_000 {
            return Err(bad(
                "SSE_GATEWAY_CLIENT_QUEUE",
                "must be between 8 and 1000000 frames",
            ));
        }
        let cors_origins = CorsOrigins::parse(self.cors_origins.as_deref())?;
        let tls = match (self.tls_cert_file, self.tls_key_file) {
            (None, None) => None,
            (Some(c), Some(k)) => Some((c, k)),
            (Some(_), None) => {
                return Err(bad(
                    "SSE_GATEWAY_TLS_KEY_FILE",
                    "SSE_GATEWAY_TLS_CERT_FILE is set without a key file; set both or neither",
                ))
            }
            (None, Some(_)) => return Err(bad(
                "SSE_GATEWAY_TLS_CERT_FILE",
                "SSE_GATEWAY_TLS_KEY_FILE is set without a certificate file; set both or neither",
            )),
        };
        if let Some((cert, key)) = &tls {
            crate::tls::load(cert, key).map_err(|e| bad("SSE_GATEWAY_TLS_CERT_FILE", e))?;
        }
        Ok(Config {
            listen,
            admin_listen,
            redis_url,
            channel_prefix: self.channel_prefix,
            jwt_key,
            jwt_issuer: self.jwt_issuer.filter(|s| !s.is_empty()),
            jwt_audience: self.jwt_audience.filter(|s| !s.is_empty()),
            jwt_leeway: secs("SSE_GATEWAY_JWT_LEEWAY_SECS", self.jwt_leeway_secs, 0, DAY)?,
            max_connections_per_user: per_user as u32,
            max_connections,
            heartbeat,
            retry_ms: self.retry_ms,
            history_size: self.history_size,
            history_ttl: secs(
                "SSE_GATEWAY_HISTORY_TTL_SECS",
                self.history_ttl_secs,
                1,
                365 * DAY,
            )?,
            drain: secs("SSE_GATEWAY_DRAIN_SECS", self.drain_secs, 0, HOUR)?,
            connection_lease: lease,
            max_event_bytes: self.max_event_bytes,
            cors_origins,
            auth_cookie: match self.auth_cookie.filter(|c| !c.is_empty()) {
                None => None,
                Some(name) => Some(validate_cookie_name(name)?),
            },
            query_token: self.query_token,
            tls,
            client_queue: self.client_queue,
            redis_probe: probe,
            token_expiry_warning: secs(
                "SSE_GATEWAY_TOKEN_EXPIRY_WARNING_SECS",
                self.token_expiry_warning_secs,
                0,
                DAY,
            )?,
            max_stream_age: secs(
                "SSE_GATEWAY_MAX_STREAM_SECS",
                self.max_stream_secs,
                0,
                30 * DAY,
            )?,
            header_timeout: secs(
                "SSE_GATEWAY_HEADER_TIMEOUT_SECS",
                self.header_timeout_secs,
                1,
                HOUR,
            )?,
            write_timeout: secs(
                "SSE_GATEWAY_WRITE_TIMEOUT_SECS",
                self.write_timeout_secs,
                1,
                HOUR,
            )?,
            admin_token: AdminToken::from_setting(self.admin_token.as_deref()),
            admin_advertise: match self.admin_advertise.filter(|a| !a.trim().is_empty()) {
                None => None,
                Some(a) => Some(validate_advertise(a.trim())?),
            },
            max_pending_handshakes: positive(
                "SSE_GATEWAY_MAX_PENDING_HANDSHAKES",
                self.max_pending_handshakes as u64,
            )? as usize,
            presence_channels: presence_channels(
                self.presence_channels.as_deref(),
                self.history_size,
            )?,
            presence_leave_grace: secs(
                "SSE_GATEWAY_PRESENCE_LEAVE_GRACE_SECS",
                self.presence_leave_grace_secs,
                0,
                HOUR,
            )?,
        })
    }
}

/// A cookie name as RFC 6265 allows it (an HTTP token: no separators, spaces or controls).
fn validate_cookie_name(name: String) -> Result<String, ConfigError> {
    let token_char = |c: char| c.is_ascii_graphic() && !"()<>@,;:\\\"/[]?={}".contains(c);
    if name.chars().all(token_char) {
        Ok(name)
    } else {
        Err(bad(
            "SSE_GATEWAY_AUTH_COOKIE",
            format!("{name:?} is not a cookie name: use letters, digits and -_.!#$%&'*+^`|~ only"),
        ))
    }
}

/// `host:port` with a non-empty host and a port that is not 0.
fn validate_advertise(value: &str) -> Result<String, ConfigError> {
    let ok = value.rsplit_once(':').is_some_and(|(host, port)| {
        !host.is_empty()
            && !host.contains(char::is_whitespace)
            && port.parse::<u16>().is_ok_and(|p| p != 0)
    });
    if ok {
        Ok(value.to_string())
    } else {
        Err(bad(
            "SSE_GATEWAY_ADMIN_ADVERTISE",
            format!("{value:?} is not host:port (example: 10.1.2.3:9090)"),
        ))
    }
}

/// Where other replicas and `inspect` reach an admin port bound to `bound`: the configured
/// address, else `bound` itself, else (bound to an unspecified address) this host's first
/// non-loopback address with the bound port.
pub fn admin_advertise(configured: Option<&str>, bound: SocketAddr) -> String {
    if let Some(a) = configured {
        return a.to_string();
    }
    if !bound.ip().is_unspecified() {
        return bound.to_string();
    }
    let first = if_addrs::get_if_addrs().ok().and_then(|ifs| {
        let usable = |i: &&if_addrs::Interface| !i.is_loopback() && !i.is_link_local();
        ifs.iter()
            .filter(usable)
            .find(|i| i.ip().is_ipv4() == bound.is_ipv4())
            .or_else(|| ifs.iter().find(usable))
            .map(|i| i.ip())
    });
    match first {
        Some(ip) => SocketAddr::new(ip, bound.port()).to_string(),
        None => bound.to_string(),
    }
}

/// Picks the decoding key and its single algorithm from a PEM public key.
pub fn decoding_key_for_pem(
    pem: &[u8],
) -> Result<(jsonwebtoken::DecodingKey, jsonwebtoken::Algorithm), String> {
    use jsonwebtoken::{Algorithm, DecodingKey};
    if let Ok(k) = DecodingKey::from_rsa_pem(pem) {
        return Ok((k, Algorithm::RS256));
    }
    if let Ok(k) = DecodingKey::from_ec_pem(pem) {
        return Ok((k, Algorithm::ES256));
    }
    if let Ok(k) = DecodingKey::from_ed_pem(pem) {
        return Ok((k, Algorithm::EdDSA));
    }
    Err("not a PEM RSA, EC P-256 or Ed25519 public key".into())
}

fn validate_redis_url(url: String) -> Result<String, ConfigError> {
    const SETTING: &str = "SSE_GATEWAY_REDIS_URL";
    // Parse it the way the replica will, so a typo fails here rather than at the first connect.
    crate::backends::redis::Topology::parse(&url).map_err(|e| bad(SETTING, e))?;
    Ok(url)
}

fn random_secret() -> Vec<u8> {
    use rand::RngCore;
    let mut key = vec![0u8; 32];
    rand::rng().fill_bytes(&mut key);
    key
}

impl Config {
    /// Whether this replica runs in single-replica mode (no Redis).
    pub fn single_replica(&self) -> bool {
        self.redis_url.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(args: &[&str]) -> Settings {
        let mut full = vec!["sse-gateway"];
        full.extend_from_slice(args);
        Cli::try_parse_from(full).expect("parses").settings
    }

    #[test]
    fn defaults_give_development_mode() {
        let c = settings(&[]).into_config().expect("valid");
        assert!(matches!(c.jwt_key, JwtKey::Development(_)));
        assert_eq!(c.listen.port(), 8080);
        assert_eq!(c.heartbeat, Duration::from_secs(15));
    }

    #[test]
    fn development_mode_listens_on_loopback_and_never_in_kubernetes() {
        let dev = settings(&[]).into_config().expect("valid");
        assert_eq!(dev.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(dev.admin_listen, "127.0.0.1:9090".parse().unwrap());
        let keyed = settings(&["--jwt-secret", "0123456789abcdef0123"])
            .into_config()
            .expect("valid");
        assert_eq!(keyed.listen, "0.0.0.0:8080".parse().unwrap());
        let given = settings(&["--listen", "0.0.0.0:7000"])
            .into_config()
            .expect("valid");
        assert_eq!(given.listen, "0.0.0.0:7000".parse().unwrap());
        let e = settings(&["--kubernetes-service-host", "10.0.0.1"])
            .into_config()
            .unwrap_err();
        assert_eq!(e.setting, "SSE_GATEWAY_JWT_SECRET");
        assert!(e.message.contains("Kubernetes"));
    }

    #[test]
    fn the_admin_port_is_advertised_where_others_can_reach_it() {
        let bound: SocketAddr = "127.0.0.1:9090".parse().unwrap();
        assert_eq!(admin_advertise(None, bound), "127.0.0.1:9090");
        assert_eq!(admin_advertise(Some("pod:9090"), bound), "pod:9090");
        let any: SocketAddr = "0.0.0.0:9091".parse().unwrap();
        let picked: SocketAddr = admin_advertise(None, any).parse().unwrap();
        assert_eq!(picked.port(), 9091);
        assert!(!picked.ip().is_loopback() || picked.ip().is_unspecified());
    }

    #[test]
    fn huge_timings_are_refused_not_overflowed() {
        for flag in [
            "--heartbeat-secs",
            "--jwt-leeway-secs",
            "--history-ttl-secs",
            "--drain-secs",
            "--connection-lease-secs",
            "--token-expiry-warning-secs",
            "--max-stream-secs",
            "--header-timeout-secs",
            "--write-timeout-secs",
            "--redis-probe-secs",
            "--retry-ms",
            "--history-size",
        ] {
            let e = settings(&[flag, "18446744073709551615"])
                .into_config()
                .unwrap_err();
            assert!(e.message.contains("out of range"), "{flag}: {e}");
        }
    }

    #[test]
    fn redis_without_key_is_refused() {
        let e = settings(&["--redis-url", "redis://127.0.0.1:1"])
            .into_config()
            .unwrap_err();
        assert_eq!(e.setting, "SSE_GATEWAY_JWT_SECRET");
    }

    #[test]
    fn both_keys_are_refused() {
        let e = settings(&[
            "--jwt-secret",
            "0123456789abcdef0123",
            "--jwt-public-key-file",
            "/nonexistent",
        ])
        .into_config()
        .unwrap_err();
        assert!(e.to_string().contains("both"));
    }

    #[test]
    fn bad_values_name_their_setting() {
        let e = settings(&["--listen", "nope"]).into_config().unwrap_err();
        assert_eq!(e.setting, "SSE_GATEWAY_LISTEN");
        let e = settings(&["--heartbeat-secs", "0"])
            .into_config()
            .unwrap_err();
        assert_eq!(e.setting, "SSE_GATEWAY_HEARTBEAT_SECS");
        let e = settings(&["--redis-url", "http://x"])
            .into_config()
            .unwrap_err();
        assert_eq!(e.setting, "SSE_GATEWAY_REDIS_URL");
        let e = settings(&["--cors-origins", "example.com"])
            .into_config()
            .unwrap_err();
        assert_eq!(e.setting, "SSE_GATEWAY_CORS_ORIGINS");
        for bad in ["10.0.0.1", "10.0.0.1:0", ":9090", "a b:1"] {
            let e = settings(&["--admin-advertise", bad])
                .into_config()
                .unwrap_err();
            assert_eq!(e.setting, "SSE_GATEWAY_ADMIN_ADVERTISE", "{bad}");
        }
    }
}
