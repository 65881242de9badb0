//! Hosts in network namespaces for the multi-host tests. Each host (a coordinator and N
//! workers) is a namespace with its own address in a private /24, joined by a veth pair to a
//! Linux bridge in the root namespace; the coordinator also has a management link straight to
//! the root namespace, so the test keeps watching the job while the coordinator's bridge link
//! is cut. A cut drops every packet both ways at both ends of a host's veth pair, with no reset
//! and no carrier change (what a partition looks like to the processes): `tc netem loss 100%`
//! where the kernel has netem, else a `pfifo` queue of length 0 (which drops whatever it is
//! given), else the host side of the pair set down. Dropping the [`Net`] kills whatever still
//! runs in its namespaces and deletes them, their links and the bridge, also when a test
//! panics. The daemons run as `ip netns exec <ns> <binary>` with the flags of
//! [`super::process`]'s loopback cluster.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::process::{log_file, wait_for_file, Guard};

/// The coordinator's port in its namespace (each namespace has its own ports).
pub const COORDINATOR_PORT: u16 = 7070;
/// Every worker's collective port in its namespace.
pub const COLLECTIVE_PORT: u16 = 7000;

/// How a link is cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CutKind {
    /// `tc qdisc ... netem loss 100%` on both ends.
    Netem,
    /// `tc qdisc ... pfifo limit 0` on both ends (no sch_netem in this kernel).
    ZeroQueue,
    /// `ip link set <host side> down` (no usable qdisc at all).
    LinkDown,
}

impl CutKind {
    /// The qdisc that drops everything, if this kind is one.
    fn qdisc(self) -> Option<&'static [&'static str]> {
        match self {
            Self::Netem => Some(&["netem", "loss", "100%"]),
            Self::ZeroQueue => Some(&["pfifo", "limit", "0"]),
            Self::LinkDown => None,
        }
    }
}

/// One namespace and its link to the bridge.
#[derive(Debug)]
pub struct Host {
    /// The namespace.
    pub ns: String,
    /// Its address on the bridge's /24.
    pub address: String,
    /// The root-namespace end of its veth pair (a bridge port).
    outer: String,
    /// The namespace end.
    inner: String,
}

/// Settings of a multi-host cluster, as the daemons are told them.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The coordinator's join token, given to every worker.
    pub join_token: &'static str,
    /// The coordinator's heartbeat timeout.
    pub heartbeat_timeout: Duration,
    /// The coordinator's shard task deadline (`lease_duration_ms`).
    pub task_deadline: Duration,
    /// The workers' ring timeout.
    pub ring_timeout_s: u64,
    /// Workers a job waits for.
    pub min_workers: usize,
}

/// A coordinator namespace, worker namespaces and the bridge between them; torn down on drop.
pub struct Net {
    /// The third octet of the bridge's 10.213.x.0/24 (and the management link's 10.214.x.0/24).
    subnet: u8,
    /// Prefix of every interface name (names are at most 15 characters).
    tag: String,
    bridge: Option<String>,
    /// Root-namespace links made, deleted on drop (deleting one end of a veth deletes both).
    links: Vec<String>,
    /// Namespaces made, deleted on drop.
    namespaces: Vec<String>,
    /// The coordinator's host.
    pub coordinator: Option<Host>,
    /// The workers' hosts.
    pub workers: Vec<Host>,
    /// How [`Net::cut`] cuts.
    pub cut_kind: CutKind,
}

/// Runs `program args`, returning its stderr when it fails.
fn sh(program: &str, args: &[&str]) -> Result<(), String> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run `{program}`: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// `ip args`.
fn ip(args: &[&str]) -> Result<(), String> {
    sh("ip", args)
}

/// `args` run inside namespace `ns`.
fn in_ns(ns: &str, args: &[&str]) -> Result<(), String> {
    let mut all = vec!["netns", "exec", ns];
    all.extend_from_slice(args);
    ip(&all)
}

impl Net {
    /// Makes the namespaces of a coordinator and `workers` workers for test number `test`
    /// (0..6: tests of one binary that run at once get distinct names and subnets). The error
    /// says why namespaces cannot be made here (not root, no `ip`): the caller skips.
    pub fn create(test: u8, workers: usize) -> Result<Self, String> {
        assert!(test < 6 && workers < 10, "test {test}, {workers} workers");
        let pid = std::process::id();
        // Distinct for test binaries running at once unless their pids agree modulo 40.
        let subnet = 10 + (pid % 40) as u8 * 6 + test;
        let mut net = Self {
            subnet,
            tag: format!("mh{:05}{test}", pid % 100_000),
            bridge: None,
            links: Vec::new(),
            namespaces: Vec::new(),
            coordinator: None,
            workers: Vec::new(),
            cut_kind: CutKind::LinkDown,
        };
        // What fails first (a missing `ip`, no CAP_NET_ADMIN) is the reason to skip. A
        // failure after that is a broken test machine: a panic, and the partial net is torn
        // down as it unwinds.
        let bridge = format!("{}br", net.tag);
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        net.bridge = Some(bridge.clone());
        net.build(workers)
            .unwrap_or_else(|e| panic!("making the test's network namespaces: {e}"));
        Ok(net)
    }

    /// Everything after the bridge: its address, the hosts, the management link.
    fn build(&mut self, workers: usize) -> Result<(), String> {
        let bridge = self.bridge.clone().unwrap();
        let address = format!("10.213.{}.1/24", self.subnet);
        ip(&["addr", "add", &address, "dev", &bridge])?;
        ip(&["link", "set", &bridge, "up"])?;
        let coordinator = self.host("c", 2)?;
        self.coordinator = Some(coordinator);
        for i in 0..workers {
            let host = self.host(&i.to_string(), 10 + i as u8)?;
            self.workers.push(host);
        }
        self.management_link()?;
        self.cut_kind = self.probe_cut_kind();
        Ok(())
    }

    /// A veth pair `<stem>o` (here, removed on drop) and `<stem>i` (in namespace `ns`).
    fn veth(&mut self, stem: &str, ns: &str) -> Result<(String, String), String> {
        let (outer, inner) = (format!("{stem}o"), format!("{stem}i"));
        ip(&[
            "link", "add", &outer, "type", "veth", "peer", "name", &inner, "netns", ns,
        ])?;
        self.links.push(outer.clone());
        Ok((outer, inner))
    }

    /// A namespace `spin-<tag>-<name>` at 10.213.<subnet>.<octet> on the bridge.
    fn host(&mut self, name: &str, octet: u8) -> Result<Host, String> {
        let ns = format!("spin-{}-{name}", self.tag);
        ip(&["netns", "add", &ns])?;
        self.namespaces.push(ns.clone());
        let (outer, inner) = self.veth(&format!("{}{name}", self.tag), &ns)?;
        ip(&[
            "link",
            "set",
            &outer,
            "master",
            self.bridge.as_deref().unwrap(),
        ])?;
        ip(&["link", "set", &outer, "up"])?;
        let address = format!("10.213.{}.{octet}", self.subnet);
        in_ns(
            &ns,
            &["ip", "addr", "add", &format!("{address}/24"), "dev", &inner],
        )?;
        in_ns(&ns, &["ip", "link", "set", &inner, "up"])?;
        in_ns(&ns, &["ip", "link", "set", "lo", "up"])?;
        Ok(Host {
            ns,
            address,
            outer,
            inner,
        })
    }

    /// The root namespace's own link to the coordinator: 10.214.<subnet>.1 here, .2 there.
    fn management_link(&mut self) -> Result<(), String> {
        let ns = self.coordinator_host().ns.clone();
        let (outer, inner) = self.veth(&format!("{}m", self.tag), &ns)?;
        ip(&[
            "addr",
            "add",
            &format!("10.214.{}.1/24", self.subnet),
            "dev",
            &outer,
        ])?;
        ip(&["link", "set", &outer, "up"])?;
        in_ns(
            &ns,
            &[
                "ip",
                "addr",
                "add",
                &format!("10.214.{}.2/24", self.subnet),
                "dev",
                &inner,
            ],
        )?;
        in_ns(&ns, &["ip", "link", "set", &inner, "up"])
    }

    /// The first of netem, a zero-length pfifo and a downed link this kernel allows.
    fn probe_cut_kind(&self) -> CutKind {
        let outer = &self.coordinator_host().outer;
        for kind in [CutKind::Netem, CutKind::ZeroQueue] {
            let mut args = vec!["qdisc", "add", "dev", outer.as_str(), "root"];
            args.extend_from_slice(kind.qdisc().unwrap());
            if sh("tc", &args).is_ok() {
                let _ = sh("tc", &["qdisc", "del", "dev", outer, "root"]);
                return kind;
            }
        }
        CutKind::LinkDown
    }

    /// The coordinator's host.
    pub fn coordinator_host(&self) -> &Host {
        self.coordinator.as_ref().unwrap()
    }

    /// `program` run in `host`'s namespace.
    pub fn command(host: &Host, program: &Path) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &host.ns]).arg(program);
        command
    }

    /// Drops every packet to and from `host` (both ends of its veth pair).
    pub fn cut(&self, host: &Host) {
        let result = match self.cut_kind.qdisc() {
            Some(qdisc) => {
                let mut outer = vec!["qdisc", "add", "dev", host.outer.as_str(), "root"];
                outer.extend_from_slice(qdisc);
                let mut inner = vec!["tc", "qdisc", "add", "dev", host.inner.as_str(), "root"];
                inner.extend_from_slice(qdisc);
                sh("tc", &outer).and_then(|()| in_ns(&host.ns, &inner))
            }
            None => ip(&["link", "set", &host.outer, "down"]),
        };
        result.unwrap_or_else(|e| panic!("cutting {}: {e}", host.ns));
    }

    /// Lets `host`'s packets through again.
    pub fn heal(&self, host: &Host) {
        let result = match self.cut_kind {
            CutKind::LinkDown => ip(&["link", "set", &host.outer, "up"]),
            _ => sh("tc", &["qdisc", "del", "dev", &host.outer, "root"]).and_then(|()| {
                in_ns(
                    &host.ns,
                    &["tc", "qdisc", "del", "dev", &host.inner, "root"],
                )
            }),
        };
        result.unwrap_or_else(|e| panic!("healing {}: {e}", host.ns));
    }

    /// The coordinator's URL on the bridge, for workers.
    pub fn coordinator_url(&self) -> String {
        format!(
            "http://{}:{COORDINATOR_PORT}",
            self.coordinator_host().address
        )
    }

    /// The coordinator's URL on the management link, for the test process.
    pub fn management_url(&self) -> String {
        format!("http://10.214.{}.2:{COORDINATOR_PORT}", self.subnet)
    }

    /// An address on the bridge in the root namespace (this process), `port` on it.
    pub fn root_address(&self, port: u16) -> String {
        format!("10.213.{}.1:{port}", self.subnet)
    }

    /// Starts `spin-coordinator` in its namespace, listening on every address there, with
    /// its journal and store under `dir`; returns once it has bound its port.
    pub fn start_coordinator(&self, dir: &Path, settings: &Settings) -> Guard {
        let address_file = dir.join("coordinator.addr");
        let _ = std::fs::remove_file(&address_file);
        let child = Self::command(
            self.coordinator_host(),
            &super::daemon_binary("spin-coordinator"),
        )
        .args(["--listen", &format!("0.0.0.0:{COORDINATOR_PORT}")])
        .arg("--address-file")
        .arg(&address_file)
        .arg("--journal")
        .arg(dir.join("journal.redb"))
        .env("SPIN_COORDINATOR__STORE", dir.join("store"))
        .env(
            "SPIN_COORDINATOR__MIN_WORKERS",
            settings.min_workers.to_string(),
        )
        .env("SPIN_COORDINATOR__TICK_INTERVAL_MS", "100")
        .env(
            "SPIN_COORDINATOR__HEARTBEAT_TIMEOUT_MS",
            settings.heartbeat_timeout.as_millis().to_string(),
        )
        .env(
            "SPIN_COORDINATOR__LEASE_DURATION_MS",
            settings.task_deadline.as_millis().to_string(),
        )
        .env("SPIN_COORDINATOR__JOIN_TOKEN", settings.join_token)
        .stdin(Stdio::null())
        .stderr(log_file(dir, "coordinator.log"))
        .spawn()
        .unwrap();
        let guard = Guard(child);
        wait_for_file(&address_file, Duration::from_secs(30));
        guard
    }

    /// Starts `spin-worker` number `i` in its namespace, serving its collective on its own
    /// address there, logging to `dir/worker-<i>.log`.
    pub fn start_worker(&self, i: usize, dir: &Path, settings: &Settings) -> Guard {
        let host = &self.workers[i];
        let collective = format!("{}:{COLLECTIVE_PORT}", host.address);
        let child = Self::command(host, &super::daemon_binary("spin-worker"))
            .arg("--coordinator")
            .arg(self.coordinator_url())
            .args(["--listen", &collective, "--advertise", &collective])
            .args(["--ring-timeout-s", &settings.ring_timeout_s.to_string()])
            // Long enough to outlast any partition of these tests.
            .args(["--connect-timeout-s", "120"])
            .env("SPIN_JOIN_TOKEN", settings.join_token)
            .stdin(Stdio::null())
            .stderr(log_file(dir, &format!("worker-{i}.log")))
            .spawn()
            .unwrap();
        Guard(child)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Whatever still runs in a namespace (a daemon whose guard was leaked) is killed
        // first: a namespace with live processes outlives `ip netns del`.
        for ns in &self.namespaces {
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            }
        }
        for link in &self.links {
            let _ = ip(&["link", "del", link]);
        }
        if let Some(bridge) = &self.bridge {
            let _ = ip(&["link", "del", bridge]);
        }
        for ns in &self.namespaces {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}
