//! `sse-loadtest`: opens many SSE streams against sse-gateway (or a peer system), publishes at a
//! fixed rate, and reports what an SRE sizes a deployment by.
//!
//! Every streaming scenario runs its clients through a fleet (this process, or `--workers K`
//! processes for more than one process's ~19,500 open files), prints live progress each second,
//! and ends with a summary, optionally a JSON report (`--json`) and a self-contained HTML report
//! with charts (`--html`). Latency is measured from each event's intended send time, so a stalled
//! publisher cannot hide it (no coordinated omission).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

mod clients;
mod drive;
mod fleet;
mod net;
mod oneoff;
mod report;
mod stats;

use clients::{ClientConfig, Plan};
use drive::{Publisher, Servers, Via};
use fleet::Fleet;
use net::Signer;
use report::Report;
use stats::Percentiles;

#[derive(Parser)]
#[command(
    name = "sse-loadtest",
    about = "Load generator for sse-gateway and its peers"
)]
struct Cli {
    #[command(subcommand)]
    command: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Hold N idle streams: time to open them and the servers' memory per stream.
    Idle {
        #[command(flatten)]
        common: Common,
        /// Seconds to hold the streams after they are all open.
        #[arg(long, default_value_t = 5)]
        hold_secs: u64,
    },
    /// N streams on one channel; events published at a fixed rate; delivery rate and latency.
    Broadcast {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        publish: PublishArgs,
        #[command(flatten)]
        pace: Pace,
    },
    /// One channel per stream; events to random streams; delivery latency.
    Private {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        publish: PublishArgs,
        #[command(flatten)]
        pace: Pace,
    },
    /// Connect, first bytes, close, from C workers as fast as possible: connects per second.
    Churn {
        #[command(flatten)]
        common: Common,
        /// Connecting loops (spread over --workers processes).
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// How long to run, in seconds.
        #[arg(long, default_value_t = 10)]
        secs: u64,
        /// Each loop reconnects as the same user (a returning client) instead of a new user
        /// every time: what a reconnect costs with per-user state (presence) already in place.
        #[arg(long)]
        returning_users: bool,
    },
    /// Durable numbered events to N streams that reconnect with Last-Event-ID when cut: checks
    /// every client got every event once and in order, or an honest `gateway.gap`.
    Audit {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        durable: Durable,
        /// Kill this process (e.g. a replica's PID) during the run.
        #[arg(long)]
        kill_pid: Option<u32>,
    },
    /// Kill a replica holding streams while durable events flow: time until every client is
    /// back and caught up, and the audit of what they received.
    Storm {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        durable: Durable,
        /// The replica to kill (SIGKILL).
        #[arg(long)]
        kill_pid: u32,
    },
    /// Hold idle streams multiplexed over cleartext HTTP/2 connections (prior knowledge) and
    /// report memory per stream.
    IdleH2 {
        #[command(flatten)]
        common: Common,
        /// Streams per HTTP/2 connection (the gateway allows up to 256).
        #[arg(long, default_value_t = 250)]
        per_connection: usize,
        /// Seconds to hold the streams.
        #[arg(long, default_value_t = 5)]
        hold_secs: u64,
    },
    /// Open and close N streams one after another; report connect latency (to the 200 head).
    Connect {
        #[command(flatten)]
        common: Common,
    },
    /// Durable publish throughput: POST /publish over keep-alive connections, or FCALL on Redis.
    Publish {
        #[command(flatten)]
        common: Common,
        /// `http` (POST /publish on the targets) or `redis` (FCALL on --redis-url).
        #[arg(long, default_value = "http")]
        via: String,
        /// Redis for `--via redis`.
        #[arg(long, default_value = "redis://127.0.0.1:6379")]
        redis_url: String,
        /// Function name for `--via redis`.
        #[arg(long, default_value = "sse_publish")]
        function: String,
        /// Events to publish in all.
        #[arg(long, default_value_t = 20000)]
        events: usize,
        /// Publishers working at once.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
    },
    /// Resume latency: a stream misses N durable events, reconnects with its id, and is timed
    /// until the last one arrives.
    Resume {
        #[command(flatten)]
        common: Common,
        /// Redis the replicas use (events are published with FCALL).
        #[arg(long, default_value = "redis://127.0.0.1:6379")]
        redis_url: String,
        /// Events missed.
        #[arg(long, default_value_t = 1000)]
        missed: usize,
        /// Rounds to time.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
    /// Print JSON reports side by side as a Markdown table.
    Table {
        /// Report files written with --json.
        #[arg(required = true)]
        reports: Vec<PathBuf>,
    },
    /// Estimate the replicas a workload needs from an idle report and a load report.
    Capacity {
        /// JSON report of an `idle` run (memory per stream).
        #[arg(long)]
        idle: PathBuf,
        /// JSON report of a `broadcast` or `private` run (CPU per delivery).
        #[arg(long)]
        load: PathBuf,
        /// Streams the deployment must hold.
        #[arg(long)]
        streams: f64,
        /// Events per second published.
        #[arg(long)]
        events_per_sec: f64,
        /// Streams each event reaches on average.
        #[arg(long, default_value_t = 1.0)]
        fanout: f64,
        /// Memory limit of one replica, in MiB.
        #[arg(long, default_value_t = 1024.0)]
        memory_mib: f64,
        /// CPU cores of one replica.
        #[arg(long, default_value_t = 1.0)]
        cores: f64,
        /// Share of a replica's CPU and memory to plan for.
        #[arg(long, default_value_t = 0.6)]
        utilization: f64,
        /// Streams one replica may hold (its open-file limit minus a margin).
        #[arg(long, default_value_t = 19_500.0)]
        max_streams_per_replica: f64,
    },
    /// Internal: the client side of a run in a worker process (started by --workers).
    #[command(hide = true)]
    ClientWorker,
}

impl Scenario {
    /// The settings every run against a system takes (none for the report tools).
    fn common(&self) -> Option<&Common> {
        match self {
            Scenario::Idle { common, .. }
            | Scenario::Broadcast { common, .. }
            | Scenario::Private { common, .. }
            | Scenario::Churn { common, .. }
            | Scenario::Audit { common, .. }
            | Scenario::Storm { common, .. }
            | Scenario::IdleH2 { common, .. }
            | Scenario::Connect { common }
            | Scenario::Publish { common, .. }
            | Scenario::Resume { common, .. } => Some(common),
            _ => None,
        }
    }

    /// The thresholds the run is judged by (the scenarios that write a report; the one-off
    /// ones are judged by their own checks).
    fn gate(&self) -> Option<Gate> {
        self.common().map(|c| c.gate.clone())
    }

    /// Where the report goes (`--json`, `--html`), for the scenarios that write one (the one-off
    /// scenarios print their figures only).
    fn outputs(&self) -> (Option<String>, Option<String>) {
        match self {
            Scenario::IdleH2 { .. }
            | Scenario::Connect { .. }
            | Scenario::Publish { .. }
            | Scenario::Resume { .. } => (None, None),
            _ => self
                .common()
                .map_or((None, None), |c| (c.json.clone(), c.html.clone())),
        }
    }
}

#[derive(Args, Clone, Debug)]
pub(crate) struct Gate {
    /// Fail when the delivery latency p99 (for churn and idle: the connect p99) is above this.
    #[arg(long)]
    max_p99_ms: Option<f64>,
    /// Fail when fewer than this share of the expected deliveries arrived.
    #[arg(long, default_value_t = 1.0)]
    min_delivered: f64,
    /// Fail when more events than this were lost silently (audit and storm), or repeated.
    #[arg(long, default_value_t = 0)]
    max_lost: u64,
    /// Fail when fewer than this share of the requested streams opened.
    #[arg(long, default_value_t = 1.0)]
    min_open_ratio: f64,
    /// Fail when churn made fewer connects per second than this.
    #[arg(long)]
    min_connects_per_s: Option<f64>,
}

impl Gate {
    /// Every threshold the report breaches, as one line each.
    fn breaches(&self, r: &Report) -> Vec<String> {
        let mut out = Vec::new();
        let p99 = r
            .latency_ms
            .as_ref()
            .or(r.connect_ms.as_ref().filter(|_| r.deliveries_expected == 0))
            .map(|p| p.p99);
        if let (Some(max), Some(p99)) = (self.max_p99_ms, p99) {
            if p99 > max {
                out.push(format!("p99 {p99:.2} ms is above --max-p99-ms {max}"));
            }
        }
        if r.deliveries_expected > 0 {
            let share = r.deliveries as f64 / r.deliveries_expected as f64;
            if share < self.min_delivered {
                out.push(format!(
                    "{} of {} deliveries ({:.3}%) is below --min-delivered {}",
                    r.deliveries,
                    r.deliveries_expected,
                    share * 100.0,
                    self.min_delivered
                ));
            }
        }
        if let Some(a) = &r.audit {
            let lost = a.lost + a.missing_at_end;
            if lost > self.max_lost || a.repeated > 0 {
                out.push(format!(
                    "{lost} events lost and {} repeated; --max-lost is {} and none may repeat",
                    a.repeated, self.max_lost
                ));
            }
        }
        if r.streams_requested > 0 {
            let share = r.streams_opened as f64 / r.streams_requested as f64;
            if share < self.min_open_ratio {
                out.push(format!(
                    "{} of {} streams opened, below --min-open-ratio {}",
                    r.streams_opened, r.streams_requested, self.min_open_ratio
                ));
            }
        }
        if let (Some(min), Some(rate)) = (self.min_connects_per_s, r.connects_per_sec) {
            if rate < min {
                out.push(format!(
                    "{rate:.0} connects/s is below --min-connects-per-s {min}"
                ));
            }
        }
        out
    }
}

#[derive(Args)]
pub(crate) struct Common {
    /// Client addresses of the system under test (streams are spread round-robin).
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:8080")]
    targets: Vec<SocketAddr>,
    /// Admin addresses of sse-gateway replicas: memory and CPU from their /metrics.
    #[arg(long, value_delimiter = ',')]
    admins: Vec<SocketAddr>,
    /// PIDs of the server processes: memory and CPU from /proc (any system; wins over --admins).
    #[arg(long, value_delimiter = ',')]
    pids: Vec<u32>,
    /// HS256 secret of the replicas, to mint tokens.
    #[arg(
        long,
        env = "SSE_GATEWAY_JWT_SECRET",
        hide_env_values = true,
        default_value = ""
    )]
    secret: String,
    /// Sign tokens with this private key (PEM: RSA for RS256, EC P-256 for ES256, Ed25519 for
    /// EdDSA) instead of the secret, for replicas that verify with its public key.
    #[arg(long)]
    private_key_file: Option<PathBuf>,
    /// Streams to open.
    #[arg(long, default_value_t = 1000)]
    streams: usize,
    /// Channel the streams subscribe to (`private` appends `-<stream>`).
    #[arg(long, default_value = "load")]
    channel: String,
    /// Local addresses to connect from, round-robin (e.g. 127.0.0.2,127.0.0.3).
    #[arg(long, value_delimiter = ',')]
    source_ips: Vec<IpAddr>,
    /// Connection attempts in flight at once (per process).
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// Client processes; each holds every K-th stream (one holds at most ~19,500).
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Name of the system under test, for the reports.
    #[arg(long, default_value = "sse-gateway")]
    label: String,
    /// Name of the run in the reports (default: the scenario), e.g. `light` for a slow broadcast.
    #[arg(long)]
    name: Option<String>,
    /// Write the JSON report here.
    #[arg(long)]
    json: Option<String>,
    /// Write the self-contained HTML report here.
    #[arg(long)]
    html: Option<String>,
    /// Spread the streams' first connects evenly over this many seconds (0: as fast as
    /// --connect-concurrency allows).
    #[arg(long, default_value_t = 0.0)]
    ramp_secs: f64,
    #[command(flatten)]
    gate: Gate,
}

impl Common {
    fn servers(&self) -> Servers {
        Servers {
            pids: self.pids.clone(),
            admins: self.admins.clone(),
        }
    }

    /// How tokens are signed (the secret, or `--private-key-file`).
    fn signer(&self) -> Result<Signer, String> {
        if self.secret.is_empty() && self.private_key_file.is_none() {
            return Err(
                "no signing key: set SSE_GATEWAY_JWT_SECRET (or --secret), or --private-key-file"
                    .into(),
            );
        }
        Signer::new(&self.secret, self.private_key_file.as_deref())
    }

    fn clients(&self, plan: Plan, streams: usize) -> Result<ClientConfig, String> {
        Ok(ClientConfig {
            plan,
            targets: self.targets.clone(),
            source_ips: self.source_ips.clone(),
            signer: self.signer()?,
            streams,
            channel: self.channel.clone(),
            connect_concurrency: self.connect_concurrency,
            reconnect_jitter_ms: 500,
            index: 0,
            count: 1,
            returning_users: false,
            ramp_ms: (self.ramp_secs.max(0.0) * 1000.0) as u64,
        })
    }

    fn report(&self, scenario: &str, params: serde_json::Value) -> Report {
        Report {
            scenario: self.name.clone().unwrap_or_else(|| scenario.into()),
            system: self.label.clone(),
            started: net::unix_nanos() / 1_000_000_000,
            params,
            streams_requested: self.streams as u64,
            ..Report::default()
        }
    }
}

#[derive(Args)]
struct PublishArgs {
    /// How events enter the system: `redis` (PUBLISH), `fcall` (durable, Redis function),
    /// `http` (POST /publish on the targets) or `nchan` (POST to Nchan's publisher location).
    #[arg(long, default_value = "redis")]
    via: String,
    /// Redis of the system under test.
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// Channel prefix for `--via redis`.
    #[arg(long, default_value = "sse:")]
    prefix: String,
    /// Nchan's publisher address (default: the first target).
    #[arg(long)]
    nchan_publish: Option<SocketAddr>,
    /// Nchan's publisher path; the channel goes in `?channel=`.
    #[arg(long, default_value = "/pub")]
    nchan_path: String,
}

impl PublishArgs {
    fn via(&self, common: &Common) -> Result<Via, String> {
        Ok(match self.via.as_str() {
            "redis" => Via::Redis {
                url: self.redis_url.clone(),
                prefix: self.prefix.clone(),
            },
            "fcall" => Via::Fcall {
                url: self.redis_url.clone(),
            },
            "http" => Via::Gateway {
                targets: common.targets.clone(),
                signer: common.signer()?,
            },
            "nchan" => Via::Nchan {
                addr: self.nchan_publish.unwrap_or(common.targets[0]),
                path: self.nchan_path.clone(),
            },
            other => {
                return Err(format!(
                    "--via {other}: expected redis, fcall, http or nchan"
                ))
            }
        })
    }
}

#[derive(Args)]
struct Pace {
    /// Events to publish.
    #[arg(long, default_value_t = 200)]
    events: u64,
    /// Events per second.
    #[arg(long, default_value_t = 20)]
    rate: u64,
    /// Seconds to wait for the last deliveries after the last publish.
    #[arg(long, default_value_t = 10)]
    grace_secs: u64,
}

#[derive(Args)]
struct Durable {
    #[command(flatten)]
    publish: PublishArgs,
    /// Seconds to publish for.
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// Events per second.
    #[arg(long, default_value_t = 20)]
    rate: u64,
    /// Seconds into publishing when --kill-pid is killed.
    #[arg(long, default_value_t = 3)]
    kill_after_secs: u64,
    /// Seconds to wait after the last publish for every client to catch up.
    #[arg(long, default_value_t = 20)]
    grace_secs: u64,
}

async fn idle(common: Common, hold: Duration) -> Result<Report, String> {
    let servers = common.servers();
    let mut report = common.report("idle", serde_json::json!({ "hold_secs": hold.as_secs() }));
    let before = servers.rss().await;
    let fleet = Fleet::start(common.clients(Plan::Idle, common.streams)?, common.workers)?;
    report.streams_opened = fleet.ready().await as u64;
    report.open_secs = fleet.read(|s| s.ready_at).unwrap_or_default().as_secs_f64();
    tokio::time::sleep(hold).await;
    let after = servers.rss().await;
    if let (Some(b), Some(a)) = (before, after) {
        report.server_rss_mib = Some(a / 1048576.0);
        report.rss_per_stream_kib = Some((a - b) / report.streams_opened.max(1) as f64 / 1024.0);
    }
    let (_, agg) = fleet.stop(0).await;
    finish_report(&mut report, &agg, None);
    Ok(report)
}

/// Copies the run totals into the report.
fn finish_report(report: &mut Report, agg: &stats::Aggregate, summary: Option<clients::Summary>) {
    report.deliveries = agg.delivered;
    report.latency_ms = Percentiles::of(&agg.latency);
    report.connect_ms = Percentiles::of(&agg.connect);
    report.failed = agg.failed;
    report.failures = agg.causes.clone();
    report.series = agg.series.clone();
    report.audit = summary;
}

async fn streaming(
    scenario: &str,
    common: Common,
    publish: PublishArgs,
    pace: Pace,
) -> Result<Report, String> {
    let plan = if scenario == "private" {
        Plan::Private
    } else {
        Plan::Broadcast
    };
    let via = publish.via(&common)?;
    let servers = common.servers();
    let mut report = common.report(
        scenario,
        serde_json::json!({ "events": pace.events, "rate": pace.rate, "via": publish.via }),
    );
    let mut publisher = Publisher::connect(via).await?;
    let fleet = Fleet::start(common.clients(plan, common.streams)?, common.workers)?;
    let opened = fleet.ready().await as u64;
    report.streams_opened = opened;
    report.open_secs = fleet.read(|s| s.ready_at).unwrap_or_default().as_secs_f64();
    // Subscriptions are made when a stream opens; give every system the same moment to settle.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cpu_before = servers.cpu().await;
    let t0 = net::unix_nanos();
    let delivered_before = fleet.read(|s| s.agg.delivered);
    let streams = common.streams as u64;
    let mut xorshift = 0x9e37_79b9_7f4a_7c15u64;
    let channel = common.channel.clone();
    let published = drive::paced(
        &mut publisher,
        pace.events,
        pace.rate,
        false,
        |_| {
            if plan == Plan::Private {
                xorshift ^= xorshift << 13;
                xorshift ^= xorshift >> 7;
                xorshift ^= xorshift << 17;
                format!("{channel}-{}", xorshift % streams.max(1))
            } else {
                channel.clone()
            }
        },
        |_| {},
    )
    .await;
    let expected = if plan == Plan::Private {
        published
    } else {
        published * opened
    };
    fleet
        .wait_for(Duration::from_secs(pace.grace_secs), |s| {
            s.agg.delivered - delivered_before >= expected
        })
        .await;
    let cpu_after = servers.cpu().await;
    let (summary, agg) = fleet.stop(published).await;
    let window = summary.last_delivery_ns.saturating_sub(t0) as f64 / 1e9;
    finish_report(&mut report, &agg, None);
    report.events_published = published;
    report.deliveries_expected = expected;
    report.deliveries_per_sec = Some(report.deliveries as f64 / window.max(0.001));
    // `/metrics` counts CPU in whole seconds: a short run may show none; --pids is exact.
    if let (Some(b), Some(a)) = (cpu_before, cpu_after.filter(|a| Some(*a) > cpu_before)) {
        report.server_cpu_secs = Some(a - b);
        report.cpu_ms_per_1k_deliveries =
            Some((a - b) * 1000.0 / (report.deliveries.max(1) as f64 / 1000.0));
    }
    Ok(report)
}

async fn churn(
    common: Common,
    concurrency: usize,
    secs: u64,
    returning_users: bool,
) -> Result<Report, String> {
    let mut report = common.report(
        "churn",
        serde_json::json!({ "concurrency": concurrency, "secs": secs, "returning_users": returning_users }),
    );
    report.streams_requested = 0;
    let mut clients = common.clients(Plan::Churn, concurrency)?;
    clients.returning_users = returning_users;
    let fleet = Fleet::start(clients, common.workers)?;
    fleet.ready().await;
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let (_, agg) = fleet.stop(0).await;
    finish_report(&mut report, &agg, None);
    report.connects_per_sec = Some(agg.connects as f64 / secs.max(1) as f64);
    Ok(report)
}

async fn audit(
    scenario: &str,
    common: Common,
    durable: Durable,
    kill_pid: Option<u32>,
) -> Result<Report, String> {
    let via = match durable.publish.via.as_str() {
        // Durable events are the point: plain PUBLISH would have no ids to resume from.
        "redis" => Via::Fcall {
            url: durable.publish.redis_url.clone(),
        },
        _ => durable.publish.via(&common)?,
    };
    let mut report = common.report(
        scenario,
        serde_json::json!({
            "secs": durable.secs, "rate": durable.rate, "kill_pid": kill_pid,
            "kill_after_secs": durable.kill_after_secs,
        }),
    );
    let mut publisher = Publisher::connect(via).await?;
    let fleet = Fleet::start(common.clients(Plan::Audit, common.streams)?, common.workers)?;
    let opened = fleet.ready().await as u64;
    report.streams_opened = opened;
    report.open_secs = fleet.read(|s| s.ready_at).unwrap_or_default().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let events = durable.secs * durable.rate;
    let kill_at = durable.kill_after_secs * durable.rate;
    let mut killed_at = None;
    let channel = common.channel.clone();
    let t0 = net::unix_nanos();
    let published = drive::paced(
        &mut publisher,
        events,
        durable.rate,
        true,
        |_| channel.clone(),
        |i| {
            if let (Some(pid), true) = (kill_pid, i == kill_at) {
                let killed = std::process::Command::new("kill")
                    .args(["-9", &pid.to_string()])
                    .status()
                    .is_ok_and(|s| s.success());
                if killed {
                    killed_at = Some(net::unix_nanos());
                } else {
                    eprintln!("could not kill PID {pid}: is --kill-pid right?");
                }
            }
        },
    )
    .await;
    let expected = published * opened;
    let caught_up = fleet
        .wait_for(Duration::from_secs(durable.grace_secs), |s| {
            s.agg.behind() == 0 && s.agg.delivered >= expected
        })
        .await;
    if !caught_up {
        eprintln!(
            "not every client caught up within --grace-secs {}",
            durable.grace_secs
        );
    }
    let (summary, agg) = fleet.stop(published).await;
    if let Some(killed_ns) = killed_at {
        // From the kill until the last client received an event published after it lost its
        // stream: every client back and caught up.
        report.storm_recovery_secs = (caught_up && summary.last_recovered_ns > killed_ns)
            .then(|| (summary.last_recovered_ns - killed_ns) as f64 / 1e9);
        let mut h = stats::histogram();
        stats::add_buckets(&mut h, &summary.recovery);
        report.recovery_ms = Percentiles::of(&h);
    }
    let window = summary.last_delivery_ns.saturating_sub(t0) as f64 / 1e9;
    finish_report(&mut report, &agg, Some(summary));
    report.events_published = published;
    report.deliveries_expected = expected;
    report.deliveries_per_sec = Some(report.deliveries as f64 / window.max(0.001));
    Ok(report)
}

fn load(path: &PathBuf) -> Result<Report, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{} is not a report: {e}", path.display()))
}

/// How a run ended: it passed, its own checks failed, or a threshold was breached.
enum Outcome {
    Passed,
    Failed,
    Breached,
}

async fn run(command: Scenario) -> Result<Outcome, String> {
    let outputs = command.outputs();
    let gate = command.gate();
    let judged = |passed: bool| {
        if passed {
            Outcome::Passed
        } else {
            Outcome::Failed
        }
    };
    let report = match command {
        Scenario::Idle { common, hold_secs } => {
            idle(common, Duration::from_secs(hold_secs)).await?
        }
        Scenario::Broadcast {
            common,
            publish,
            pace,
        } => streaming("broadcast", common, publish, pace).await?,
        Scenario::Private {
            common,
            publish,
            pace,
        } => streaming("private", common, publish, pace).await?,
        Scenario::Churn {
            common,
            concurrency,
            secs,
            returning_users,
        } => churn(common, concurrency, secs, returning_users).await?,
        Scenario::Audit {
            common,
            durable,
            kill_pid,
        } => audit("audit", common, durable, kill_pid).await?,
        Scenario::Storm {
            common,
            durable,
            kill_pid,
        } => audit("storm", common, durable, Some(kill_pid)).await?,
        Scenario::IdleH2 {
            common,
            per_connection,
            hold_secs,
        } => {
            return oneoff::idle_h2(common, per_connection, Duration::from_secs(hold_secs))
                .await
                .map(judged);
        }
        Scenario::Connect { common } => {
            return oneoff::connect_latency(common).await.map(judged);
        }
        Scenario::Publish {
            common,
            via,
            redis_url,
            function,
            events,
            concurrency,
        } => {
            return oneoff::publish_throughput(
                common,
                via,
                redis_url,
                function,
                events,
                concurrency,
            )
            .await
            .map(judged);
        }
        Scenario::Resume {
            common,
            redis_url,
            missed,
            rounds,
        } => {
            return oneoff::resume_latency(common, redis_url, missed, rounds)
                .await
                .map(judged);
        }
        Scenario::Table { reports } => {
            let reports = reports.iter().map(load).collect::<Result<Vec<_>, _>>()?;
            print!("{}", report::table(&reports));
            return Ok(Outcome::Passed);
        }
        Scenario::Capacity {
            idle,
            load: load_path,
            streams,
            events_per_sec,
            fanout,
            memory_mib,
            cores,
            utilization,
            max_streams_per_replica,
        } => {
            let sizing = report::Sizing {
                streams,
                deliveries_per_sec: events_per_sec * fanout,
                memory_per_replica_mib: memory_mib,
                cores_per_replica: cores,
                utilization,
                max_streams_per_replica,
            };
            println!(
                "{}",
                report::capacity(&load(&idle)?, &load(&load_path)?, &sizing)?
            );
            return Ok(Outcome::Passed);
        }
        Scenario::ClientWorker => {
            fleet::worker_main().await?;
            return Ok(Outcome::Passed);
        }
    };
    print!("{}", report.summary());
    report.write(outputs.0.as_deref(), outputs.1.as_deref())?;
    // Thresholds (every one has a default: nothing lost or repeated, every stream open, every
    // delivery made), so a run that opened one stream out of many fails, as scripts and CI
    // expect.
    let breaches = gate.map(|g| g.breaches(&report)).unwrap_or_default();
    for b in &breaches {
        println!("threshold breached: {b}");
    }
    Ok(if breaches.is_empty() {
        Outcome::Passed
    } else {
        Outcome::Breached
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse().command).await {
        Ok(Outcome::Passed) => ExitCode::SUCCESS,
        Ok(Outcome::Failed) => ExitCode::from(1),
        Ok(Outcome::Breached) => ExitCode::from(3),
        Err(e) => {
            eprintln!("sse-loadtest: {e}");
            ExitCode::from(2)
        }
    }
}
