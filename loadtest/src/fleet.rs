//! Runs the client side in this process or in worker processes, and merges what they report.
//!
//! One process can hold about 19,500 streams (the open-file limit), so `--workers K` starts K
//! copies of this binary (`client-worker`), each taking every K-th stream. A worker gets its
//! configuration in an environment variable (the secret stays out of `ps`), reports JSON lines on
//! stdout and is told to stop, with the number of events published, on stdin.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, watch, Notify};

use crate::clients::{self, ClientConfig, Msg, Summary};
use crate::stats::{Aggregate, Sample};

const CONFIG_ENV: &str = "SSE_LOADTEST_CLIENT";

/// Everything the driver knows about the clients so far.
pub(crate) struct State {
    pub(crate) agg: Aggregate,
    pub(crate) ready: usize,
    pub(crate) opened: usize,
    pub(crate) done: usize,
    pub(crate) summary: Summary,
    /// When the last source became ready: the time to open every stream.
    pub(crate) ready_at: Option<Duration>,
}

/// The running clients.
pub(crate) struct Fleet {
    state: Arc<Mutex<State>>,
    changed: Arc<Notify>,
    stop: watch::Sender<Option<u64>>,
    sources: usize,
    started: Instant,
    progress: tokio::task::JoinHandle<()>,
}

impl Fleet {
    /// Starts the clients: in this process when `workers <= 1`, else in `workers` processes.
    pub(crate) fn start(cfg: ClientConfig, workers: usize) -> Result<Self, String> {
        let sources = workers.max(1);
        let (tx, mut rx) = mpsc::unbounded_channel::<(usize, Msg)>();
        let (stop, stop_rx) = watch::channel(None);
        if sources == 1 {
            let (out, mut inner) = mpsc::unbounded_channel();
            let cfg = Arc::new(ClientConfig {
                index: 0,
                count: 1,
                ..cfg
            });
            tokio::spawn(clients::run(cfg, out, stop_rx));
            let tx = tx.clone();
            tokio::spawn(async move {
                while let Some(m) = inner.recv().await {
                    let _ = tx.send((0, m));
                }
            });
        } else {
            let exe = std::env::current_exe().map_err(|e| format!("cannot find myself: {e}"))?;
            for index in 0..sources {
                let mine = ClientConfig {
                    index,
                    count: sources,
                    ..cfg.clone()
                };
                let json = serde_json::to_string(&mine).map_err(|e| e.to_string())?;
                let mut child = tokio::process::Command::new(&exe)
                    .arg("client-worker")
                    .env(CONFIG_ENV, json)
                    .stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::piped())
                    .kill_on_drop(true)
                    .spawn()
                    .map_err(|e| format!("cannot start worker {index}: {e}"))?;
                let (Some(stdout), Some(mut stdin)) = (child.stdout.take(), child.stdin.take())
                else {
                    return Err("worker pipes missing".into());
                };
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut lines = BufReader::new(stdout).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        match serde_json::from_str::<Msg>(&line) {
                            Ok(m) => {
                                let _ = tx.send((index, m));
                            }
                            Err(e) => eprintln!("worker {index}: unreadable report line: {e}"),
                        }
                    }
                    let _ = child.wait().await;
                });
                let mut stop_rx = stop_rx.clone();
                tokio::spawn(async move {
                    while stop_rx.changed().await.is_ok() {
                        let published = *stop_rx.borrow();
                        if let Some(n) = published {
                            let _ = stdin.write_all(format!("{n}\n").as_bytes()).await;
                            let _ = stdin.flush().await;
                            break;
                        }
                    }
                });
            }
        }
        let state = Arc::new(Mutex::new(State {
            agg: Aggregate::new(sources),
            ready: 0,
            opened: 0,
            done: 0,
            summary: Summary::default(),
            ready_at: None,
        }));
        let changed = Arc::new(Notify::new());
        let started = Instant::now();
        {
            let (state, changed) = (state.clone(), changed.clone());
            tokio::spawn(async move {
                while let Some((source, msg)) = rx.recv().await {
                    if let Ok(mut s) = state.lock() {
                        match msg {
                            Msg::Ready(n) => {
                                s.ready += 1;
                                s.opened += n;
                                if s.ready == sources {
                                    s.ready_at = Some(started.elapsed());
                                }
                            }
                            Msg::Tick(t) => s.agg.add(source, &t),
                            Msg::Done(d) => {
                                s.done += 1;
                                s.summary.merge(&d);
                            }
                        }
                    }
                    changed.notify_waiters();
                }
            });
        }
        let progress = {
            let state = state.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(Duration::from_secs(1));
                every.tick().await;
                loop {
                    every.tick().await;
                    let sample = match state.lock() {
                        Ok(mut s) => s.agg.close(started.elapsed().as_secs_f64()),
                        Err(_) => break,
                    };
                    eprintln!("{}", progress_line(&sample));
                }
            })
        };
        Ok(Self {
            state,
            changed,
            stop,
            sources,
            started,
            progress,
        })
    }

    /// Waits until `check` holds for the state or `timeout` passes; returns whether it held.
    pub(crate) async fn wait_for(
        &self,
        timeout: Duration,
        mut check: impl FnMut(&State) -> bool,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            if self.state.lock().is_ok_and(|s| check(&s)) {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.state.lock().is_ok_and(|s| check(&s));
            }
        }
    }

    /// Waits until every stream has made its first attempt; returns how many are open.
    pub(crate) async fn ready(&self) -> usize {
        let sources = self.sources;
        self.wait_for(Duration::from_secs(3600), |s| s.ready == sources)
            .await;
        self.read(|s| s.opened)
    }

    pub(crate) fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&s)
    }

    /// Stops the clients, telling them how many numbered events were published; returns the
    /// merged totals and the time series.
    pub(crate) async fn stop(self, published: u64) -> (Summary, Aggregate) {
        let _ = self.stop.send(Some(published));
        let sources = self.sources;
        if !self
            .wait_for(Duration::from_secs(30), |s| s.done == sources)
            .await
        {
            eprintln!(
                "some clients did not finish within 30 s of the stop; reporting without them"
            );
        }
        self.progress.abort();
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let t = self.started.elapsed().as_secs_f64();
        s.agg.close(t);
        let summary = std::mem::take(&mut s.summary);
        let agg = std::mem::replace(&mut s.agg, Aggregate::new(0));
        (summary, agg)
    }
}

fn progress_line(s: &Sample) -> String {
    let latency = s.latency.map_or_else(String::new, |l| {
        format!(
            "  latency p50 {:.2} p99 {:.2} max {:.2} ms",
            l.p50, l.p99, l.max
        )
    });
    format!(
        "[{:>5.0}s] open {:>6}  behind {:>5}  delivered {:>7}/s  connects {:>6}/s  failed {:>4}{latency}",
        s.t, s.open, s.behind, s.delivered, s.connects, s.failed
    )
}

/// The `client-worker` side: runs the clients from the configuration in the environment and
/// speaks the line protocol.
pub(crate) async fn worker_main() -> Result<(), String> {
    let json = std::env::var(CONFIG_ENV)
        .map_err(|_| format!("{CONFIG_ENV} is not set: this command is started by the tool"))?;
    let cfg: ClientConfig = serde_json::from_str(&json).map_err(|e| e.to_string())?;
    let (out, mut msgs) = mpsc::unbounded_channel();
    let (stop, stop_rx) = watch::channel(None);
    tokio::spawn(async move {
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        let n = match lines.next_line().await {
            Ok(Some(l)) => l.trim().parse().unwrap_or(0),
            _ => 0,
        };
        let _ = stop.send(Some(n));
        // Keep the sender alive so the clients never see the driver vanish mid-run.
        std::future::pending::<()>().await;
    });
    tokio::spawn(clients::run(Arc::new(cfg), out, stop_rx));
    let mut stdout = tokio::io::stdout();
    while let Some(m) = msgs.recv().await {
        let done = matches!(m, Msg::Done(_));
        let mut line = serde_json::to_string(&m).map_err(|e| e.to_string())?;
        line.push('\n');
        stdout
            .write_all(line.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        stdout.flush().await.map_err(|e| e.to_string())?;
        if done {
            break;
        }
    }
    Ok(())
}
