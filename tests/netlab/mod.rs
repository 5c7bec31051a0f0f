//! A small network lab: "hosts" are Linux network namespaces, each plugged by a veth pair into
//! one bridge in this machine's root namespace, with addresses from the benchmarking range
//! 198.18.0.0/15 (one /24 per lab). The test process itself sits on the bridge too (the /24's
//! `.1`), so it reaches every host, and hosts reach each other over the bridge.
//!
//! Faults, each a small helper: a host that goes silent towards another (blackhole routes:
//! packets leave, nothing comes back, no FIN, no RST), a partition between two hosts (both
//! ways), healing it, a bandwidth cap on what reaches a host (`tc tbf`: this kernel has no
//! `netem`, so there is no delay injection), and process pause/continue (SIGSTOP/SIGCONT, on
//! the fixtures). Everything a lab creates — namespaces, links, the bridge, processes — is
//! removed when it drops, even when the test fails. Needs root and `ip`; where namespaces
//! cannot be created, [`Lab::new`] says why and the test skips.

#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// One host: a namespace with one address on the lab's bridge.
pub struct Host {
    /// Namespace name (for `ip netns exec`, `Gateway::start_in`, `Redis::start_in`).
    pub ns: String,
    /// The host's address.
    pub addr: Ipv4Addr,
    /// The root namespace's address on the bridge (where this machine's test process sits).
    pub gateway: Ipv4Addr,
    /// Link names: root side (on the bridge), host side.
    root_link: String,
    host_link: String,
    children: Vec<Child>,
}

impl Host {
    /// Starts `program args…` inside the host's namespace.
    pub fn spawn(&mut self, program: &str, args: &[&str]) -> &mut Child {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns, program])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("ip netns exec");
        self.children.push(child);
        self.children.last_mut().expect("just pushed")
    }

    /// From now on this host's packets to `to` are dropped where they start: `to` sees
    /// silence (no ACK, no FIN, no RST), as from a dead NAT or a killed VM.
    pub fn silence_towards(&self, to: Ipv4Addr) {
        let dest = format!("{to}/32");
        ip(&["-n", &self.ns, "route", "replace", "blackhole", &dest]).expect("blackhole route");
    }

    /// Undoes [`Host::silence_towards`].
    pub fn speak_to(&self, to: Ipv4Addr) {
        let dest = format!("{to}/32");
        let _ = ip(&["-n", &self.ns, "route", "del", "blackhole", &dest]);
    }

    /// The host goes silent towards this machine's test process.
    pub fn cut(&self) {
        self.silence_towards(self.gateway);
    }

    /// Undoes [`Host::cut`].
    pub fn restore(&self) {
        self.speak_to(self.gateway);
    }

    /// Caps what reaches this host (`tc tbf` on the bridge side of its link).
    pub fn cap_kbit(&self, kbit: u32) {
        let rate = format!("{kbit}kbit");
        let out = Command::new("tc")
            .args([
                "qdisc",
                "replace",
                "dev",
                &self.root_link,
                "root",
                "tbf",
                "rate",
                &rate,
                "burst",
                "4kb",
                "latency",
                "400ms",
            ])
            .output()
            .expect("tc");
        assert!(
            out.status.success(),
            "tc: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A partition between two hosts: neither hears the other, and neither is told.
pub fn partition(a: &Host, b: &Host) {
    a.silence_towards(b.addr);
    b.silence_towards(a.addr);
}

/// Heals a [`partition`].
pub fn heal(a: &Host, b: &Host) {
    a.speak_to(b.addr);
    b.speak_to(a.addr);
}

impl Drop for Host {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Deleting the namespace deletes its end of the pair, and with it the root's end.
        let _ = ip(&["netns", "del", &self.ns]);
        let _ = ip(&["link", "del", &self.root_link]);
    }
}

/// One bridge and the hosts plugged into it.
pub struct Lab {
    tag: String,
    bridge: String,
    /// The /24's first three octets.
    net: [u8; 3],
    /// This machine's address on the bridge.
    pub root: Ipv4Addr,
    hosts: AtomicU32,
}

impl Lab {
    /// A lab, or why one cannot be made here (not root, no `ip`, namespaces refused).
    pub fn new() -> Result<Self, String> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let tag = format!("{:x}{n}", pid % 0xfff);
        let probe = format!("sgwp{tag}");
        ip(&["netns", "add", &probe])?;
        let _ = ip(&["netns", "del", &probe]);
        // One /24 of 198.18.0.0/15 per lab, spread by process and lab number.
        let index = ((pid % 128) * 4 + n) % 512;
        let net = [198, 18 + (index / 256) as u8, (index % 256) as u8];
        let root = Ipv4Addr::new(net[0], net[1], net[2], 1);
        let bridge = format!("sgwb{tag}");
        ip(&["link", "add", "name", &bridge, "type", "bridge"])?;
        let lab = Self {
            tag,
            bridge: bridge.clone(),
            net,
            root,
            hosts: AtomicU32::new(0),
        };
        ip(&["addr", "add", &format!("{root}/24"), "dev", &bridge])?;
        ip(&["link", "set", &bridge, "up"])?;
        Ok(lab)
    }

    /// A new host plugged into the bridge.
    pub fn host(&self) -> Host {
        let n = self.hosts.fetch_add(1, Ordering::Relaxed);
        let ns = format!("sgw{}h{n}", self.tag);
        let root_link = format!("sgr{}{n}", self.tag);
        let host_link = format!("sgh{}{n}", self.tag);
        let addr = Ipv4Addr::new(self.net[0], self.net[1], self.net[2], 10 + n as u8);
        let host = Host {
            ns: ns.clone(),
            addr,
            gateway: self.root,
            root_link: root_link.clone(),
            host_link: host_link.clone(),
            children: Vec::new(),
        };
        let cidr = format!("{addr}/24");
        let steps: [&[&str]; 6] = [
            &["netns", "add", &ns],
            &[
                "link", "add", &root_link, "type", "veth", "peer", "name", &host_link, "netns", &ns,
            ],
            &["link", "set", &root_link, "master", &self.bridge, "up"],
            &["-n", &ns, "addr", "add", &cidr, "dev", &host_link],
            &["-n", &ns, "link", "set", &host_link, "up"],
            &["-n", &ns, "link", "set", "lo", "up"],
        ];
        for step in steps {
            ip(step).expect("lab host set-up");
        }
        host
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.bridge]);
    }
}
