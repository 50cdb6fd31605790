//! Network namespaces a test creates and removes: two "pods" joined by a veth pair, or a
//! "node" routing between pods (with kube-proxy's DNAT, or a bridge as a container network),
//! threads that open sockets inside a namespace, and sidecars run inside one as Istio's uid 1337.
//! Nothing here touches the host's own network: addresses exist only inside the namespaces.

#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread;

use crate::common::{DEADLINE, bin, echo_until_eof, http, serve_each, wait_for};

/// Why namespace tests cannot run here (not root, no `ip`, no `iptables`, no `setpriv`), or
/// None. The reason is also appended to `target/test-skips.txt`, which tests/run.sh prints,
/// so a skip is never mistaken for a pass.
pub fn unavailable(test: &str) -> Option<String> {
    // Probed once per test process: tests run in parallel and must not race on the probe.
    static PROBE: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let why = PROBE.get_or_init(probe).clone()?;
    crate::common::skip(test, &why);
    Some(why)
}

fn probe() -> Option<String> {
    let ok = |cmd: &str, args: &[&str]| {
        Command::new(cmd)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !ok("id", &["-u"])
        || String::from_utf8_lossy(&Command::new("id").arg("-u").output().ok()?.stdout).trim() != "0"
    {
        return Some("needs root (network namespaces, iptables)".into());
    }
    for (cmd, args) in [
        ("ip", &["-V"][..]),
        ("iptables", &["--version"]),
        ("iptables-save", &["--version"]),
        ("ip6tables", &["--version"]),
        ("setpriv", &["--version"]),
    ] {
        if !ok(cmd, args) {
            return Some(format!("`{cmd}` is not installed (tests/deps.sh installs iproute2 and iptables)"));
        }
    }
    let probe = format!("rs-probe-{}", std::process::id());
    if !ok("ip", &["netns", "add", &probe]) {
        return Some("cannot create a network namespace (`ip netns add` failed: not privileged?)".into());
    }
    let nat = ok("ip", &["netns", "exec", &probe, "iptables", "-t", "nat", "-S"]);
    let _ = ok("ip", &["netns", "del", &probe]);
    if !nat {
        return Some("iptables' nat table is not usable in a network namespace".into());
    }
    None
}

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().expect("spawn");
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Run a command inside `ns`; returns stdout, panics on failure.
pub fn exec(ns: &str, args: &[&str]) -> String {
    let out = Command::new("ip").args(["netns", "exec", ns]).args(args).output().expect("spawn ip");
    assert!(out.status.success(), "ip netns exec {ns} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `iptables-save` of `ns` without its comment lines (they carry the time) and counters.
pub fn iptables_save(ns: &str) -> String {
    exec(ns, &["iptables-save"])
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| if l.starts_with(':') { l.split(" [").next().unwrap_or(l) } else { l })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Two namespaces ("pods") joined by a veth pair: `a` has 10.77.0.1/24, `b` has 10.77.0.2/24
/// and 10.77.0.3/24. Dropping it deletes both (the veth pair goes with them).
pub struct Pods {
    /// Namespace name of pod A.
    pub a: String,
    /// Namespace name of pod B.
    pub b: String,
    /// Interface names of the veth pair (in A, in B).
    veth: (String, String),
}

/// Pod A's address.
pub const A_IP: &str = "10.77.0.1";
/// Pod B's address.
pub const B_IP: &str = "10.77.0.2";
/// Pod B's second address.
pub const B_IP2: &str = "10.77.0.3";

impl Pods {
    /// Create the pair, named uniquely for this test process.
    pub fn new() -> Pods {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}-{n}", std::process::id());
        // Interface names are per namespace, but the pair is created in ours first: unique.
        let (va, vb) = (format!("rsa{id}"), format!("rsb{id}"));
        let veth = (va[..va.len().min(15)].to_string(), vb[..vb.len().min(15)].to_string());
        let pods = Pods { a: format!("rs-a-{id}"), b: format!("rs-b-{id}"), veth };
        run(&["ip", "netns", "add", &pods.a]);
        run(&["ip", "netns", "add", &pods.b]);
        let (va, vb) = (pods.veth.0.as_str(), pods.veth.1.as_str());
        run(&[
            "ip", "link", "add", va, "netns", &pods.a, "type", "veth", "peer", "name", vb, "netns", &pods.b,
        ]);
        for (ns, dev, ips) in [(&pods.a, va, &[A_IP][..]), (&pods.b, vb, &[B_IP, B_IP2])] {
            exec(ns, &["ip", "link", "set", "lo", "up"]);
            for ip in ips {
                exec(ns, &["ip", "addr", "add", &format!("{ip}/24"), "dev", dev]);
            }
            exec(ns, &["ip", "link", "set", dev, "up"]);
            // A default route, as a pod has: a service address (a ClusterIP that no interface
            // holds) must be routable for the connect to reach the nat table at all.
            exec(ns, &["ip", "route", "add", "default", "dev", dev]);
        }
        pods
    }
}

impl Pods {
    /// Add `fd00:77::1/64` to A and `fd00:77::2/64` to B (no duplicate address detection, so
    /// they are usable at once).
    pub fn add_ipv6(&self) {
        exec(&self.a, &["ip", "-6", "addr", "add", &format!("{A_IP6}/64"), "dev", &self.veth.0, "nodad"]);
        exec(&self.b, &["ip", "-6", "addr", "add", &format!("{B_IP6}/64"), "dev", &self.veth.1, "nodad"]);
    }
}

/// Pod A's IPv6 address (after [`Pods::add_ipv6`]).
pub const A_IP6: &str = "fd00:77::1";
/// Pod B's IPv6 address.
pub const B_IP6: &str = "fd00:77::2";

impl Drop for Pods {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Run `f` on a thread that has entered `ns`: the sockets it opens live there.
pub fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    thread::scope(|s| {
        s.spawn(|| {
            enter(ns);
            f()
        })
        .join()
        .expect("netns thread")
    })
}

fn enter(ns: &str) {
    let file = std::fs::File::open(format!("/run/netns/{ns}")).expect("open netns");
    use std::os::fd::AsRawFd;
    // SAFETY: setns on a valid namespace fd changes only this thread's network namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {ns}: {}", std::io::Error::last_os_error());
}

/// An echo server in `ns` on `addr` (serving forever on detached threads); each accepted
/// connection's peer address is sent on the channel, so a test can see who connected.
pub fn echo_server_in(ns: &str, addr: &str) -> mpsc::Receiver<SocketAddr> {
    let listener = in_ns(ns, || TcpListener::bind(addr).expect("bind echo server"));
    let (tx, rx) = mpsc::channel();
    serve_each(listener, move |s: TcpStream| {
        let _ = tx.send(s.peer_addr().expect("peer"));
        echo_until_eof(s);
    });
    rx
}

/// Connect from inside `ns` (as root: not the proxy's uid, so capture applies).
pub fn connect_in(ns: &str, addr: &str) -> std::io::Result<TcpStream> {
    let addr: SocketAddr = addr.parse().expect("address");
    in_ns(ns, || TcpStream::connect_timeout(&addr, DEADLINE))
}

/// A ringside running inside a namespace as uid/gid 1337 (Istio's istio-proxy user).
pub struct Sidecar {
    child: Child,
    ns: String,
    /// Its admin address inside the namespace.
    pub admin: SocketAddr,
    /// Its log file.
    pub log: String,
}

impl Sidecar {
    /// Start `ringside run --config` with `yaml` in `ns`, waiting for /ready.
    pub fn spawn(ns: &str, yaml: &str) -> Sidecar {
        let path = std::env::temp_dir().join(format!("ringside-{ns}.yaml"));
        std::fs::write(&path, yaml).expect("write config");
        let log = std::env::temp_dir().join(format!("ringside-{ns}.log")).display().to_string();
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "setpriv", "--reuid=1337", "--regid=1337", "--clear-groups", bin()])
            .args(["run", "--config", &path.display().to_string()])
            .env("RUST_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn ringside");
        let mut sc = Sidecar { child, ns: ns.to_string(), admin: "127.0.0.1:15000".parse().unwrap(), log };
        wait_for("sidecar /ready", || {
            if let Some(status) = sc.child.try_wait().expect("wait") {
                panic!(
                    "sidecar in {ns} exited with {status}: {}",
                    std::fs::read_to_string(&sc.log).unwrap_or_default()
                );
            }
            let admin = sc.admin;
            (in_ns(&sc.ns, move || http(admin, "GET", "/ready")).map(|(c, _)| c) == Some(200)).then_some(())
        });
        sc
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// GET /stats/prometheus (from inside its namespace).
    pub fn scrape(&self) -> String {
        let admin = self.admin;
        in_ns(&self.ns, move || http(admin, "GET", "/stats/prometheus")).expect("scrape").1
    }

    /// Scrape until `done` holds; panic with the last scrape and the log after the deadline.
    pub fn wait_for_scrape(&self, what: &str, done: impl Fn(&str) -> bool) -> String {
        let start = std::time::Instant::now();
        loop {
            let last = self.scrape();
            if done(&last) {
                return last;
            }
            if start.elapsed() > DEADLINE {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                panic!("timed out waiting for {what} in {}; last scrape:\n{last}\nlog:\n{log}", self.ns);
            }
            thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The log stays for a failed test to be read; the config never does.
        let _ = std::fs::remove_file(std::env::temp_dir().join(format!("ringside-{}.yaml", self.ns)));
        if !thread::panicking() {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

/// A node: a namespace that routes between pod namespaces, each joined to it by a veth pair of
/// its own (as a routed CNI plugin wires pods), with kube-proxy's DNAT for Service addresses.
/// Pod `i` has `10.78.0.{4i+2}/30` and its default route via the node's `10.78.0.{4i+1}`; no
/// other test uses 10.78.0.0/24. Dropping it deletes the namespaces it made and the names it
/// gave (a pod namespace owned by a container lives on until the container goes).
pub struct Node {
    /// The node's namespace name.
    pub ns: String,
    id: String,
    /// Pod namespace names to delete (made here, or named by [`Node::attach`]).
    pods: Vec<String>,
}

impl Node {
    /// A node namespace that forwards IPv4, named uniquely for this test process.
    pub fn new() -> Node {
        static N: AtomicUsize = AtomicUsize::new(0);
        let id = format!("{}{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        let node = Node { ns: format!("rs-node-{id}"), id, pods: Vec::new() };
        run(&["ip", "netns", "add", &node.ns]);
        exec(&node.ns, &["ip", "link", "set", "lo", "up"]);
        exec(&node.ns, &["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]);
        node
    }

    /// A new, empty pod namespace (deleted with the node); plug it in with [`Node::plug`].
    pub fn pod(&mut self, name: &str) -> String {
        let ns = format!("rs-{name}-{}", self.id);
        run(&["ip", "netns", "add", &ns]);
        self.pods.push(ns.clone());
        ns
    }

    /// Name the network namespace of process `pid` (e.g. a pod's infra container) `rs-NAME-ID`,
    /// so `ip netns` and [`in_ns`] reach it; the name goes with the node.
    pub fn attach(&mut self, name: &str, pid: u32) -> String {
        let ns = format!("rs-{name}-{}", self.id);
        run(&["ip", "netns", "attach", &ns, &pid.to_string()]);
        self.pods.push(ns.clone());
        ns
    }

    /// Wire pod namespace `pod` to the node: the next /30 of 10.78.0.0/24, loopback up, a
    /// default route via the node. Returns the pod's address.
    pub fn plug(&mut self, pod: &str) -> String {
        let i = self.pods.iter().position(|p| p == pod).expect("a pod of this node");
        let (node_ip, pod_ip) = (format!("10.78.0.{}", 4 * i + 1), format!("10.78.0.{}", 4 * i + 2));
        let (vn, vp) = (format!("rn{}{i}", self.id), format!("rp{}{i}", self.id));
        let (vn, vp) = (&vn[..vn.len().min(15)], &vp[..vp.len().min(15)]);
        run(&["ip", "link", "add", vn, "netns", &self.ns, "type", "veth", "peer", "name", vp, "netns", pod]);
        exec(&self.ns, &["ip", "addr", "add", &format!("{node_ip}/30"), "dev", vn]);
        exec(&self.ns, &["ip", "link", "set", vn, "up"]);
        exec(pod, &["ip", "link", "set", "lo", "up"]);
        exec(pod, &["ip", "addr", "add", &format!("{pod_ip}/30"), "dev", vp]);
        exec(pod, &["ip", "link", "set", vp, "up"]);
        exec(pod, &["ip", "route", "add", "default", "via", &node_ip]);
        pod_ip
    }

    /// A bridge in the node with `gateway` (`a.b.c.d/n`), to which [`Node::join_bridge`]
    /// attaches pods as a container network does (compose's network with fixed addresses).
    pub fn bridge(&self, gateway: &str) {
        exec(&self.ns, &["ip", "link", "add", "br0", "type", "bridge"]);
        exec(&self.ns, &["ip", "addr", "add", gateway, "dev", "br0"]);
        exec(&self.ns, &["ip", "link", "set", "br0", "up"]);
    }

    /// Attach pod namespace `pod` to the node's bridge with address `addr` (`a.b.c.d/n`),
    /// loopback up, a default route via the bridge's `gateway` address.
    pub fn join_bridge(&mut self, pod: &str, addr: &str, gateway: &str) {
        let i = self.pods.iter().position(|p| p == pod).expect("a pod of this node");
        let (vn, vp) = (format!("rn{}{i}", self.id), format!("rp{}{i}", self.id));
        let (vn, vp) = (&vn[..vn.len().min(15)], &vp[..vp.len().min(15)]);
        run(&["ip", "link", "add", vn, "netns", &self.ns, "type", "veth", "peer", "name", vp, "netns", pod]);
        exec(&self.ns, &["ip", "link", "set", vn, "master", "br0", "up"]);
        exec(pod, &["ip", "link", "set", "lo", "up"]);
        exec(pod, &["ip", "addr", "add", addr, "dev", vp]);
        exec(pod, &["ip", "link", "set", vp, "up"]);
        exec(pod, &["ip", "route", "add", "default", "via", gateway]);
    }

    /// kube-proxy's rule for a ClusterIP Service with one endpoint: TCP to `vip:port` from
    /// any pod goes to `pod_ip:target_port`.
    pub fn service(&self, vip: &str, port: u16, pod_ip: &str, target_port: u16) {
        exec(
            &self.ns,
            &[
                "iptables",
                "-t",
                "nat",
                "-A",
                "PREROUTING",
                "-d",
                &format!("{vip}/32"),
                "-p",
                "tcp",
                "--dport",
                &port.to_string(),
                "-j",
                "DNAT",
                "--to-destination",
                &format!("{pod_ip}:{target_port}"),
            ],
        );
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        for ns in self.pods.iter().chain([&self.ns]) {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}
