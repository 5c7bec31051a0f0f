//! A small network lab: "hosts" are Linux network namespaces joined to this machine's root
//! namespace by veth pairs, with addresses from the benchmarking range 198.18.0.0/15, so a test
//! can pull a client's cable (no FIN, no RST) or cap its bandwidth. Everything a lab creates is
//! removed when it drops, even when the test fails. Needs root and `ip`; where namespaces cannot
//! be created, [`Lab::new`] says why and the test skips.

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

/// One host: a namespace, its end of a veth pair, and the root namespace's end.
pub struct Host {
    /// Namespace name.
    pub ns: String,
    /// The host's address.
    pub addr: Ipv4Addr,
    /// The root namespace's address on the same link (where the host reaches this machine).
    pub gateway: Ipv4Addr,
    /// Link names: root side, host side.
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

    /// The host goes silent the way a dead NAT or a killed VM does: what this machine sends
    /// still leaves, but nothing comes back — no ACK, no FIN, no RST (a blackhole route inside
    /// the host towards this machine).
    pub fn cut(&self) {
        let to = format!("{}/32", self.gateway);
        ip(&["-n", &self.ns, "route", "add", "blackhole", &to]).expect("blackhole route");
    }

    /// Undoes [`Host::cut`].
    pub fn restore(&self) {
        let to = format!("{}/32", self.gateway);
        ip(&["-n", &self.ns, "route", "del", "blackhole", &to]).expect("blackhole route");
    }

    /// Pulls the host's cable: its link goes down on its side.
    pub fn unplug(&self) {
        ip(&["-n", &self.ns, "link", "set", &self.host_link, "down"]).expect("link down");
    }

    /// Plugs the cable back in.
    pub fn plug(&self) {
        ip(&["-n", &self.ns, "link", "set", &self.host_link, "up"]).expect("link up");
    }

    /// Caps what this machine sends to the host (`tc tbf`; this kernel has no `netem`, so there
    /// is no delay injection).
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

/// Makes hosts; each gets its own /30.
pub struct Lab {
    tag: String,
}

impl Lab {
    /// A lab, or why one cannot be made here (not root, no `ip`, namespaces refused).
    pub fn new() -> Result<Self, String> {
        let tag = format!("{:x}", std::process::id() % 0xffff);
        let probe = format!("sgwp{tag}{}", NEXT.fetch_add(1, Ordering::Relaxed));
        ip(&["netns", "add", &probe])?;
        let _ = ip(&["netns", "del", &probe]);
        Ok(Self { tag })
    }

    /// A new host linked to this machine.
    pub fn host(&self) -> Host {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let ns = format!("sgw{}h{n}", self.tag);
        let root_link = format!("sgr{}{n}", self.tag);
        let host_link = format!("sgh{}{n}", self.tag);
        // 198.18.<a>.<b*4+1|2>/30, spread by process and host number.
        let subnet = (std::process::id() % 200) * 64 + n % 64;
        let (a, b) = ((subnet / 64) as u8, ((subnet % 64) * 4) as u8);
        let gateway = Ipv4Addr::new(198, 18, a, b + 1);
        let addr = Ipv4Addr::new(198, 18, a, b + 2);
        let host = Host {
            ns: ns.clone(),
            addr,
            gateway,
            root_link: root_link.clone(),
            host_link: host_link.clone(),
            children: Vec::new(),
        };
        let steps: Vec<Vec<String>> = vec![
            vec!["netns".into(), "add".into(), ns.clone()],
            vec![
                "link".into(),
                "add".into(),
                root_link.clone(),
                "type".into(),
                "veth".into(),
                "peer".into(),
                "name".into(),
                host_link.clone(),
                "netns".into(),
                ns.clone(),
            ],
            vec![
                "addr".into(),
                "add".into(),
                format!("{gateway}/30"),
                "dev".into(),
                root_link.clone(),
            ],
            vec!["link".into(), "set".into(), root_link.clone(), "up".into()],
            vec![
                "-n".into(),
                ns.clone(),
                "addr".into(),
                "add".into(),
                format!("{addr}/30"),
                "dev".into(),
                host_link.clone(),
            ],
            vec![
                "-n".into(),
                ns.clone(),
                "link".into(),
                "set".into(),
                host_link.clone(),
                "up".into(),
            ],
            vec![
                "-n".into(),
                ns.clone(),
                "link".into(),
                "set".into(),
                "lo".into(),
                "up".into(),
            ],
        ];
        for step in steps {
            let args: Vec<&str> = step.iter().map(String::as_str).collect();
            ip(&args).expect("lab host set-up");
        }
        host
    }
}
