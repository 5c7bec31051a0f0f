//! Bigger Redis topologies for tests: a real 3-master Redis Cluster (6 `redis-server`s with
//! `--cluster-enabled yes`, created with `redis-cli --cluster create`) and a master with one
//! replica watched by three Sentinels. Every process runs on a free loopback port and is killed
//! by PID when the fixture drops.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::fixtures::free_port;

/// Polls `ok` every 50 ms until it holds; fails the test with `what` after `within`.
fn wait_for(within: Duration, what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !ok() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The `redis-server` arguments of a throwaway data node on loopback `port`.
fn data_node(port: u16) -> Vec<String> {
    data_node_on("127.0.0.1", port)
}

/// The `redis-server` arguments of a throwaway data node bound to `bind`:`port`: nothing kept
/// on disk, reachable from other hosts.
pub fn data_node_on(bind: &str, port: u16) -> Vec<String> {
    [
        "--port",
        &port.to_string(),
        "--bind",
        bind,
        "--save",
        "",
        "--appendonly",
        "no",
        "--protected-mode",
        "no",
    ]
    .map(String::from)
    .to_vec()
}

/// `127.0.0.1:<port>` for each port, joined by commas (the host list of a URL).
fn hosts(ports: impl Iterator<Item = u16>) -> String {
    ports
        .map(|p| format!("127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Whether a node's replication link to its master is up.
fn synced(n: &Node) -> bool {
    n.cmd(&["INFO", "replication"])
        .is_some_and(|i| i.contains("master_link_status:up"))
}

/// One `redis-server` process.
pub struct Node {
    pub port: u16,
    child: Option<Child>,
}

impl Node {
    fn spawn(port: u16, args: &[String]) -> Self {
        let child = Command::new("redis-server")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (see README)");
        let node = Node {
            port,
            child: Some(child),
        };
        wait_for(
            Duration::from_secs(10),
            &format!("redis-server on {port} did not start"),
            || node.cmd(&["PING"]).is_some(),
        );
        node
    }

    /// Runs a command with `redis-cli`; its output, or `None` if the node does not answer.
    pub fn cmd(&self, args: &[&str]) -> Option<String> {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (out.status.success() && !text.starts_with("Could not connect")).then_some(text)
    }

    /// Sends a signal (`STOP`, `CONT`, …): a stopped node keeps its connections open and
    /// answers nothing.
    pub fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .args([&format!("-{sig}"), &c.id().to_string()])
                .status();
        }
    }

    /// SIGKILL, like a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

fn temp_dir(what: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "sse-gateway-test-{what}-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// A Redis Cluster of 3 masters, each with one replica.
pub struct Cluster {
    pub nodes: Vec<Node>,
    dir: std::path::PathBuf,
}

impl Cluster {
    pub fn start() -> Self {
        let dir = temp_dir("cluster");
        let nodes: Vec<Node> = (0..6)
            .map(|_| {
                let port = free_port();
                let d = dir.to_string_lossy();
                let mut args = data_node(port);
                args.extend([
                    "--cluster-enabled".into(),
                    "yes".into(),
                    "--cluster-config-file".into(),
                    format!("{d}/nodes-{port}.conf"),
                    // Failover a second or two after a master dies.
                    "--cluster-node-timeout".into(),
                    "1500".into(),
                    "--dir".into(),
                    d.to_string(),
                ]);
                Node::spawn(port, &args)
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("redis-cli");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let cluster = Cluster { nodes, dir };
        cluster.wait_healthy(Duration::from_secs(30));
        // A replica that has never synced cannot take over: wait for all three links.
        wait_for(Duration::from_secs(30), "the replicas did not sync", || {
            cluster.nodes.iter().filter(|n| synced(n)).count() == 3
        });
        cluster
    }

    /// `redis+cluster://` with every node as a seed.
    pub fn url(&self) -> String {
        format!(
            "redis+cluster://{}",
            hosts(self.nodes.iter().map(|n| n.port))
        )
    }

    fn any(&self) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.child.is_some() && n.cmd(&["PING"]).is_some())
            .expect("a live cluster node")
    }

    /// Waits until every slot is served and every live node agrees the cluster is ok.
    pub fn wait_healthy(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let ok = self.nodes.iter().filter(|n| n.child.is_some()).all(|n| {
                n.cmd(&["CLUSTER", "INFO"]).is_some_and(|i| {
                    i.contains("cluster_state:ok") && i.contains("cluster_slots_ok:16384")
                })
            }) && self.masters().len() == 3;
            if ok {
                return;
            }
            if Instant::now() >= deadline {
                let info: Vec<String> = self
                    .nodes
                    .iter()
                    .filter(|n| n.child.is_some())
                    .map(|n| n.cmd(&["CLUSTER", "INFO"]).unwrap_or_default())
                    .map(|i| i.lines().take(4).collect::<Vec<_>>().join(" "))
                    .collect();
                panic!(
                    "the cluster did not become healthy: masters {:?}; {info:?}",
                    self.masters()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// (port, first slot, last slot) of every slot range, from a live node's view.
    pub fn slot_ranges(&self) -> Vec<(u16, u16, u16)> {
        let text = self.any().cmd(&["CLUSTER", "NODES"]).unwrap_or_default();
        let mut ranges = Vec::new();
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 9 || !f[2].contains("master") || f[2].contains("fail") {
                continue;
            }
            let port: u16 = f[1]
                .split('@')
                .next()
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            for r in &f[8..] {
                if let Some((a, b)) = r.split_once('-') {
                    ranges.push((port, a.parse().unwrap_or(0), b.parse().unwrap_or(0)));
                } else if let Ok(s) = r.parse() {
                    ranges.push((port, s, s));
                }
            }
        }
        ranges
    }

    /// Ports of the masters that hold slots.
    pub fn masters(&self) -> Vec<u16> {
        let mut m: Vec<u16> = self.slot_ranges().iter().map(|r| r.0).collect();
        m.sort();
        m.dedup();
        m
    }

    /// Waits until `port` no longer serves as a master (a replica took over, within 30 s).
    pub async fn wait_failover_from(&self, port: u16) {
        let started = Instant::now();
        while self.masters().contains(&port) {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "no replica took over from {port}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The master serving `slot`.
    pub fn owner(&self, slot: u16) -> u16 {
        self.slot_ranges()
            .into_iter()
            .find(|r| r.1 <= slot && slot <= r.2)
            .map(|r| r.0)
            .expect("every slot has an owner")
    }

    /// The master serving `key`'s slot, as the cluster itself computes it (`CLUSTER KEYSLOT`).
    pub fn owner_of(&self, key: &str) -> u16 {
        let slot = self
            .any()
            .cmd(&["CLUSTER", "KEYSLOT", key])
            .and_then(|s| s.parse::<u16>().ok())
            .expect("CLUSTER KEYSLOT answers a slot");
        self.owner(slot)
    }

    /// One channel name `<prefix><i>` per master whose pub/sub name `sse:<name>` (and so every
    /// key of the channel) that master serves, with the master's port.
    pub fn channel_per_master(&self, prefix: &str) -> Vec<(String, u16)> {
        let mut out: Vec<(String, u16)> = Vec::new();
        let masters = self.masters();
        for i in 0.. {
            let name = format!("{prefix}{i}");
            let owner = self.owner_of(&format!("sse:{name}"));
            if !out.iter().any(|(_, m)| *m == owner) {
                out.push((name, owner));
            }
            if out.len() == masters.len() {
                break;
            }
        }
        out.sort_by_key(|(_, m)| masters.iter().position(|x| x == m));
        out
    }

    pub fn node(&mut self, port: u16) -> &mut Node {
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .expect("a node of this cluster")
    }

    /// The node id of the node on `port`.
    pub fn id(&self, port: u16) -> String {
        let node = self.nodes.iter().find(|n| n.port == port).expect("a node");
        node.cmd(&["CLUSTER", "MYID"]).unwrap_or_default()
    }

    /// Moves one slot, with its keys, from its owner to the master on `to`, the way
    /// `redis-cli --cluster reshard` does: IMPORTING, MIGRATING, MIGRATE, then SETSLOT NODE.
    pub fn move_slot(&self, slot: u16, to: u16) {
        let from = self.owner(slot);
        let (from_id, to_id) = (self.id(from), self.id(to));
        let node = |p: u16| self.nodes.iter().find(|n| n.port == p).expect("a node");
        let s = slot.to_string();
        node(to).cmd(&["CLUSTER", "SETSLOT", &s, "IMPORTING", &from_id]);
        node(from).cmd(&["CLUSTER", "SETSLOT", &s, "MIGRATING", &to_id]);
        let keys = node(from)
            .cmd(&["CLUSTER", "GETKEYSINSLOT", &s, "1000"])
            .unwrap_or_default();
        let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
        if !keys.is_empty() {
            let port = to.to_string();
            let mut args = vec![
                "MIGRATE",
                "127.0.0.1",
                port.as_str(),
                "",
                "0",
                "5000",
                "KEYS",
            ];
            args.extend(keys);
            node(from).cmd(&args);
        }
        for n in self.nodes.iter().filter(|n| n.child.is_some()) {
            n.cmd(&["CLUSTER", "SETSLOT", &s, "NODE", &to_id]);
        }
    }

    /// `SPUBLISH` on the shard that owns the channel; how many subscribers got it.
    pub fn spublish(&self, channel: &str, payload: &str) -> i64 {
        let slot = self
            .nodes
            .iter()
            .find(|n| n.child.is_some())
            .and_then(|n| n.cmd(&["CLUSTER", "KEYSLOT", channel]))
            .and_then(|s| s.parse().ok())
            .expect("a live node tells the channel's slot");
        let port = self.owner(slot);
        let node = self.nodes.iter().find(|n| n.port == port).expect("owner");
        node.cmd(&["SPUBLISH", channel, payload])
            .and_then(|s| s.parse().ok())
            .unwrap_or(-1)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A master, one replica, and three Sentinels watching them as `mymaster`.
pub struct Sentinels {
    pub master: Node,
    pub replica: Node,
    pub sentinels: Vec<Node>,
    dir: std::path::PathBuf,
}

impl Sentinels {
    pub fn start() -> Self {
        let dir = temp_dir("sentinel");
        let data = data_node;
        let mport = free_port();
        let master = Node::spawn(mport, &data(mport));
        let rport = free_port();
        let mut rargs = data(rport);
        rargs.extend(["--replicaof".into(), "127.0.0.1".into(), mport.to_string()]);
        let replica = Node::spawn(rport, &rargs);
        let sentinels = (0..3)
            .map(|_| {
                let port = free_port();
                let conf = dir.join(format!("sentinel-{port}.conf"));
                std::fs::write(
                    &conf,
                    format!(
                        "port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {}\n\
                         sentinel monitor mymaster 127.0.0.1 {mport} 2\n\
                         sentinel down-after-milliseconds mymaster 1000\n\
                         sentinel failover-timeout mymaster 5000\n\
                         sentinel parallel-syncs mymaster 1\n",
                        dir.to_string_lossy()
                    ),
                )
                .expect("sentinel config");
                Node::spawn(
                    port,
                    &[conf.to_string_lossy().into_owned(), "--sentinel".into()],
                )
            })
            .collect();
        let set = Sentinels {
            master,
            replica,
            sentinels,
            dir,
        };
        // Wait until the replica is in sync and the sentinels know it.
        wait_for(
            Duration::from_secs(20),
            "the Sentinel set did not settle",
            || {
                synced(&set.replica)
                    && set.sentinels.iter().all(|s| {
                        s.cmd(&["SENTINEL", "replicas", "mymaster"])
                            .is_some_and(|r| r.contains(&rport.to_string()))
                    })
            },
        );
        set
    }

    /// `redis+sentinel://` with every Sentinel, for the master `mymaster`.
    pub fn url(&self) -> String {
        format!(
            "redis+sentinel://{}/mymaster",
            hosts(self.sentinels.iter().map(|s| s.port))
        )
    }

    /// The port the Sentinels name as master now.
    pub fn master_port(&self) -> Option<u16> {
        self.sentinels.iter().find_map(|s| {
            s.cmd(&["SENTINEL", "get-master-addr-by-name", "mymaster"])?
                .lines()
                .nth(1)?
                .trim()
                .parse()
                .ok()
        })
    }
}

impl Drop for Sentinels {
    fn drop(&mut self) {
        for s in &mut self.sentinels {
            s.kill();
        }
        self.master.kill();
        self.replica.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
