//! docker/ for real: the images docker/build-local.sh builds with no registry, run by podman
//! (runtime runc) in network namespaces the test makes: a node that routes between pods and
//! does kube-proxy's DNAT for Service redis, and pods that are namespaces of their own. Once
//! the pods of docker/k8s/ by hand (`podman run`: istio-init, then the application and the
//! sidecar), with exact istio_tcp_* counts on both reporters and a drain on `podman stop`; once
//! the manifests themselves (`podman kube play`); once compose.yaml's services as it defines
//! them (no compose engine: a compose network needs a bridge on the host). podman keeps everything (images, containers,
//! its config) in a directory of the test's, removed at the end even on failure. Without root,
//! namespaces or podman, each test prints a SKIP line (never under CI, which installs podman
//! with tests/deps.sh).

mod common;
#[path = "common/netns.rs"]
mod netns;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{CLOSED, DEADLINE, OPENED, RECEIVED, SENT, http, sum, wait_for};
use netns::{Node, in_ns, iptables_save};
use serde_yaml_ng::Value;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// podman with a configuration and storage of the test's own, in a temporary directory:
/// runtime runc (crun refuses this host's hybrid cgroups), cgroupfs, the descriptor and
/// process limits this machine allows, the cluster's DNS names as base /etc/hosts. Dropping it
/// removes every container, pod and image it made, then the directory.
struct Podman {
    dir: PathBuf,
}

impl Podman {
    /// podman, or None after a SKIP line when it cannot run here (a panic under CI).
    fn available(test: &str, hosts: &str) -> Option<Podman> {
        if netns::unavailable(test).is_some() {
            return None;
        }
        for tool in ["podman", "runc", "catatonit"] {
            let ok = Command::new(tool).arg("--version").output().is_ok_and(|o| o.status.success());
            if !ok {
                assert!(
                    std::env::var("CI").as_deref() != Ok("true"),
                    "{tool} is missing under CI: tests/deps.sh installs it"
                );
                common::skip(
                    test,
                    &format!("`{tool}` is not installed (tests/deps.sh installs podman, runc, catatonit)"),
                );
                return None;
            }
        }
        Some(Podman::new(hosts))
    }

    fn new(hosts: &str) -> Podman {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ringside-podman-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        for sub in ["root", "run", "tmp", "cni"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let d = dir.display();
        std::fs::write(
            dir.join("storage.conf"),
            format!("[storage]\ndriver = \"overlay\"\ngraphroot = \"{d}/root\"\nrunroot = \"{d}/run\"\n"),
        )
        .unwrap();
        std::fs::write(dir.join("hosts"), format!("127.0.0.1 localhost\n{hosts}")).unwrap();
        // podman's default limits (nofile 1048576) exceed this machine's: runc cannot set them.
        // An nproc limit of 50000 is refused too (EPERM), so a modest one.
        let mut nofile = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit writes the struct it is given.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut nofile) }, 0);
        std::fs::write(
            dir.join("containers.conf"),
            format!(
                "[containers]\nbase_hosts_file = \"{d}/hosts\"\n\
                 default_ulimits = [\"nofile={n}:{n}\", \"nproc=4096:4096\"]\n\
                 [engine]\nruntime = \"runc\"\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n\
                 events_logfile_path = \"{d}/events.log\"\ntmp_dir = \"{d}/tmp\"\n\
                 [network]\nnetwork_config_dir = \"{d}/cni\"\n",
                n = nofile.rlim_cur.min(nofile.rlim_max)
            ),
        )
        .unwrap();
        Podman { dir }
    }

    /// A command that runs with this podman's configuration.
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", self.dir.join("storage.conf"));
        cmd
    }

    fn output(&self, args: &[&str]) -> Output {
        self.command("podman").args(args).output().expect("spawn podman")
    }

    /// `podman ARGS`; its stdout, trimmed. Panics with stderr when it fails.
    fn run(&self, args: &[&str]) -> String {
        let out = self.output(args);
        assert!(out.status.success(), "podman {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// `podman inspect --format FORMAT NAME`.
    fn inspect(&self, name: &str, format: &str) -> String {
        self.run(&["inspect", "--format", format, name])
    }

    /// A container's output (stdout, then stderr).
    fn logs(&self, name: &str) -> String {
        let out = self.output(&["logs", name]);
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    }

    /// docker/build-local.sh with the binary under test (a debug build: see docker/README.md)
    /// and the workloads' stand-in image.
    fn build_images(&self) {
        let out = self
            .command("bash")
            .arg(repo().join("docker/build-local.sh"))
            .args(["podman", "--workloads"])
            .env("RINGSIDE_BIN", common::bin())
            .output()
            .expect("spawn build-local.sh");
        let text =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "build-local.sh:\n{text}");
        let images = self.run(&["images", "--format", "{{.Repository}}:{{.Tag}}"]);
        for image in ["localhost/ringside:dev", "localhost/ringside-init:dev", "localhost/redis:7-bookworm"] {
            assert!(images.lines().any(|l| l == image), "{image} in {images}");
        }
        // docker/Dockerfile's layout: uid 1337, the binary, Istio's ports; the init image
        // runs as root.
        let config = "{{.Config.User}} {{.Config.Entrypoint}} {{.Config.Cmd}} {{.Config.ExposedPorts}}";
        let sidecar = self.run(&["image", "inspect", "--format", config, "ringside:dev"]);
        assert!(
            sidecar.starts_with(
                "1337:1337 [/usr/local/bin/ringside] [run --config /etc/ringside/ringside.yaml] "
            ),
            "{sidecar}"
        );
        for port in ["15000", "15001", "15006", "15021", "15090"] {
            assert!(sidecar.contains(&format!("{port}/tcp")), "{port} exposed: {sidecar}");
        }
        let init = self.run(&["image", "inspect", "--format", config, "ringside-init:dev"]);
        // No user (root): the output starts at the entry point, trimmed.
        assert!(init.starts_with("[/usr/local/bin/ringside] [iptables --print]"), "{init}");
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        for args in [
            &["pod", "rm", "--all", "--force", "--time", "0"][..],
            &["rm", "--all", "--force", "--time", "0"],
            &["rmi", "--all", "--force"],
            // Unmounts the storage and removes it.
            &["system", "reset", "--force"],
        ] {
            let _ = self.output(args);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// docker/k8s/, read as YAML documents.
struct Manifests {
    docs: Vec<Value>,
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v:?}"))
}

impl Manifests {
    fn read() -> Manifests {
        let mut docs = Vec::new();
        for file in ["ratings-v2.yaml", "redis.yaml", "ringside-config.yaml"] {
            let text = std::fs::read_to_string(repo().join("docker/k8s").join(file)).unwrap();
            for doc in serde_yaml_ng::Deserializer::from_str(&text) {
                docs.push(serde::Deserialize::deserialize(doc).unwrap());
            }
        }
        Manifests { docs }
    }

    fn kind(&self, kind: &str, name: &str) -> &Value {
        self.docs
            .iter()
            .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("{kind} {name} in docker/k8s"))
    }

    /// A container of Deployment `deployment`'s pod (`list`: containers or initContainers).
    fn container(&self, deployment: &str, list: &str, name: &str) -> &Value {
        self.kind("Deployment", deployment)["spec"]["template"]["spec"][list]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|c| c["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("{deployment}: no {list} {name}"))
    }

    fn strings(v: &Value) -> Vec<String> {
        v.as_sequence().map(|a| a.iter().map(|x| s(x).to_string()).collect()).unwrap_or_default()
    }

    /// The ringside config Deployment `deployment` mounts (its ConfigMap key).
    fn sidecar_config(&self, deployment: &str) -> String {
        let spec = &self.kind("Deployment", deployment)["spec"]["template"]["spec"];
        let key = s(&spec["volumes"][0]["configMap"]["items"][0]["key"]);
        s(&self.kind("ConfigMap", "ringside")["data"][key]).to_string()
    }

    /// Service redis: (name, ClusterIP, port, target port).
    fn redis_service(&self) -> (String, String, u16, u16) {
        let spec = &self.kind("Service", "redis")["spec"];
        let port = |k: &str| spec["ports"][0][k].as_u64().unwrap() as u16;
        ("redis".into(), s(&spec["clusterIP"]).to_string(), port("port"), port("targetPort"))
    }
}

/// GET `path` on `addr` from inside namespace `ns`.
fn http_in(ns: &str, addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    in_ns(ns, move || http(addr, "GET", path))
}

/// Wait until the sidecar at `ip` answers /healthz/ready on its health port from `ns`.
fn wait_ready(ns: &str, ip: &str) {
    let health: SocketAddr = format!("{ip}:15021").parse().unwrap();
    wait_for("sidecar /healthz/ready on 15021", || {
        (http_in(ns, health, "/healthz/ready").map(|(c, _)| c) == Some(200)).then_some(())
    });
}

fn scrape(ns: &str, ip: &str) -> String {
    let metrics: SocketAddr = format!("{ip}:15090").parse().unwrap();
    let (code, body) = http_in(ns, metrics, "/stats/prometheus").expect("scrape the metrics port");
    assert_eq!(code, 200, "{body}");
    body
}

/// Scrape `ip`'s metrics port from `ns` until `done` holds (bounded by `deadline`).
fn wait_for_scrape(
    ns: &str,
    ip: &str,
    what: &str,
    deadline: Duration,
    done: impl Fn(&str) -> bool,
) -> String {
    let start = Instant::now();
    loop {
        let last = scrape(ns, ip);
        if done(&last) {
            return last;
        }
        assert!(start.elapsed() < deadline, "timed out waiting for {what}; last scrape of {ip}:\n{last}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One RESP inline PING on `s`, answered `+PONG`.
fn ping(s: &mut TcpStream) {
    s.write_all(b"PING\r\n").unwrap();
    let mut pong = [0u8; 7];
    s.read_exact(&mut pong).unwrap();
    assert_eq!(&pong, b"+PONG\r\n");
}

const PING: f64 = 6.0; // "PING\r\n"
const PONG: f64 = 7.0; // "+PONG\r\n"

/// A connection from inside pod namespace `ns` (as root: not the proxy's uid, so captured).
fn connect_in(ns: &str, addr: &str) -> TcpStream {
    let addr: SocketAddr = addr.parse().unwrap();
    let s = in_ns(ns, move || TcpStream::connect_timeout(&addr, DEADLINE)).expect("connect");
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s
}

/// The process status line `field` (e.g. `Uid`) of process `pid`.
fn status_field(pid: &str, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(&format!("{field}:"))).unwrap();
    line.split_whitespace().skip(1).collect::<Vec<_>>().join(" ")
}

#[test]
fn the_pods_run_by_hand_capture_both_ways_report_exact_metrics_on_both_reporters_and_drain_on_podman_stop() {
    let k8s = Manifests::read();
    let (service, vip, port, target_port) = k8s.redis_service();
    let Some(podman) = Podman::available("containers::by_hand", &format!("{vip} {service}\n")) else {
        return;
    };
    podman.build_images();
    let mut node = Node::new();
    let redis_ns = node.pod("redis");
    let ratings_ns = node.pod("ratings");
    let redis_ip = node.plug(&redis_ns);
    let ratings_ip = node.plug(&ratings_ns);
    node.service(&vip, port, &redis_ip, target_port);
    let net = |ns: &str| format!("ns:/run/netns/{ns}");
    let id = std::process::id();

    // As the kubelet starts a pod: istio-init to completion (its arguments and capabilities
    // as the manifest gives them), then the containers.
    for (deployment, ns) in [("redis-v1", &redis_ns), ("ratings-v2", &ratings_ns)] {
        let init = k8s.container(deployment, "initContainers", "istio-init");
        let caps = Manifests::strings(&init["securityContext"]["capabilities"]["add"]).join(",");
        let network = net(ns);
        let mut args = vec!["run", "--rm", "--network", &network, "--user", "0:0", "--cap-drop", "ALL"];
        args.extend(["--cap-add", &caps, "--security-opt", "no-new-privileges", "ringside-init:dev"]);
        let init_args = Manifests::strings(&init["args"]);
        args.extend(init_args.iter().map(String::as_str));
        podman.run(&args);
        let rules = iptables_save(ns);
        for rule in [
            "-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT",
            "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
            "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
            "-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN",
        ] {
            assert!(rules.lines().any(|l| l == rule), "{deployment}: {rule} in\n{rules}");
        }
    }

    // redis-v1's application: the manifest's arguments, uid 999.
    let redis = k8s.container("redis-v1", "containers", "redis");
    let redis_args = Manifests::strings(&redis["args"]);
    let app = format!("redis-{id}");
    let network = net(&redis_ns);
    let mut args = vec!["run", "-d", "--name", &app, "--network", &network, "--user", "999:999"];
    args.extend(["--cap-drop", "ALL", "localhost/redis:7-bookworm"]);
    args.extend(redis_args.iter().map(String::as_str));
    podman.run(&args);

    // The sidecars: the ConfigMap's key mounted read-only at /etc/ringside, uid 1337 from the
    // image, the manifest's limits and security context.
    let mut sidecars = Vec::new();
    for (deployment, ns, ip) in [("redis-v1", &redis_ns, &redis_ip), ("ratings-v2", &ratings_ns, &ratings_ip)]
    {
        let config = podman.dir.join(deployment);
        std::fs::create_dir_all(&config).unwrap();
        std::fs::write(config.join("ringside.yaml"), k8s.sidecar_config(deployment)).unwrap();
        let name = format!("{deployment}-ringside-{id}");
        let volume = format!("{}:/etc/ringside:ro", config.display());
        let network = net(ns);
        let mut args =
            vec!["run", "-d", "--name", &name, "--network", &network, "--read-only", "--cap-drop", "ALL"];
        args.extend(["--security-opt", "no-new-privileges", "--cpus", "1", "--memory", "128m"]);
        args.extend(["--volume", &volume, "ringside:dev"]);
        podman.run(&args);
        wait_ready(&node.ns, ip);
        let pid = podman.inspect(&name, "{{.State.Pid}}");
        assert_eq!(status_field(&pid, "Uid"), "1337 1337 1337 1337", "{deployment}: the sidecar's uid");
        assert_eq!(status_field(&pid, "Gid"), "1337 1337 1337 1337", "{deployment}: the sidecar's gid");
        assert_eq!(
            podman.inspect(&name, "{{range .Mounts}}{{.Destination}} rw={{.RW}}{{end}}"),
            "/etc/ringside rw=false",
            "{deployment}: its config is mounted read-only"
        );
        sidecars.push(name);
    }

    // ratings-v2's application dials Service redis; both pods' capture takes the connection.
    let connections = 3;
    for _ in 0..connections {
        let mut s = connect_in(&ratings_ns, &format!("{vip}:{port}"));
        ping(&mut s);
    }
    let n = connections as f64;
    let source = [
        ("reporter", "source"),
        ("source_workload", "ratings-v2"),
        ("source_canonical_service", "ratings"),
        ("destination_workload", "redis-v1"),
        ("destination_version", "v1"),
        ("destination_service", "redis.default.svc.cluster.local"),
        ("response_flags", "-"),
    ];
    let text = wait_for_scrape(&node.ns, &ratings_ip, "source-side closes", DEADLINE, |t| {
        sum(t, CLOSED, &source) == n
    });
    assert_eq!(sum(&text, OPENED, &source), n, "{text}");
    assert_eq!(sum(&text, RECEIVED, &source), n * PING, "{text}");
    assert_eq!(sum(&text, SENT, &source), n * PONG, "{text}");
    for metric in [OPENED, CLOSED, RECEIVED, SENT] {
        assert_eq!(sum(&text, metric, &[]), sum(&text, metric, &source), "no other series: {text}");
    }
    let destination = [
        ("reporter", "destination"),
        ("source_workload", "ratings-v2"),
        ("source_version", "v2"),
        ("destination_workload", "redis-v1"),
        ("destination_service", "redis.default.svc.cluster.local"),
        ("response_flags", "-"),
    ];
    let text = wait_for_scrape(&node.ns, &redis_ip, "destination-side closes", DEADLINE, |t| {
        sum(t, CLOSED, &destination) == n
    });
    assert_eq!(sum(&text, OPENED, &destination), n, "{text}");
    assert_eq!(sum(&text, RECEIVED, &destination), n * PING, "{text}");
    assert_eq!(sum(&text, SENT, &destination), n * PONG, "{text}");
    for metric in [OPENED, CLOSED, RECEIVED, SENT] {
        assert_eq!(sum(&text, metric, &[]), sum(&text, metric, &destination), "no other series: {text}");
    }

    // `podman stop` (SIGTERM) on redis-v1's sidecar while a connection is live: readiness
    // fails at once, the connection keeps flowing until its client closes it, the sidecar
    // exits 0.
    let mut live = connect_in(&ratings_ns, &format!("{vip}:{port}"));
    ping(&mut live);
    let stopper = {
        let cmd = podman.command("podman");
        let name = sidecars[0].clone();
        std::thread::spawn(move || {
            let mut cmd = cmd;
            cmd.args(["stop", "--time", "30", &name]).output().expect("podman stop")
        })
    };
    let health: SocketAddr = format!("{redis_ip}:15021").parse().unwrap();
    wait_for("the draining sidecar to fail readiness", || {
        (http_in(&node.ns, health, "/healthz/ready").map(|(c, _)| c) == Some(503)).then_some(())
    });
    ping(&mut live);
    drop(live);
    let stopped = stopper.join().unwrap();
    assert!(stopped.status.success(), "podman stop: {}", String::from_utf8_lossy(&stopped.stderr));
    assert_eq!(podman.inspect(&sidecars[0], "{{.State.ExitCode}}"), "0", "drained and exited 0");
    let logs = podman.logs(&sidecars[0]);
    assert!(logs.contains("draining for") && logs.contains("drained; exiting"), "{logs}");
    let text = wait_for_scrape(&node.ns, &ratings_ip, "the drained connection's close", DEADLINE, |t| {
        sum(t, CLOSED, &source) == n + 1.0
    });
    assert_eq!(sum(&text, RECEIVED, &source), (n + 2.0) * PING, "no byte lost in the drain: {text}");
    assert_eq!(sum(&text, SENT, &source), (n + 2.0) * PONG, "no byte lost in the drain: {text}");
    podman.run(&["stop", "--time", "30", &sidecars[1]]);
    assert_eq!(podman.inspect(&sidecars[1], "{{.State.ExitCode}}"), "0");
}

/// Scrape both sidecars until the two reporters agree on at least `at_least` connections
/// from ratings-v2 to redis-v1, all closed, with the same bytes both ways: ratings' client
/// runs batches with pauses between, in which both sides have seen the batch end.
fn wait_for_a_finished_batch(
    podman: &Podman,
    node: &str,
    source: &str,
    destination: &str,
    at_least: f64,
    client: &str,
) {
    let src =
        [("reporter", "source"), ("source_workload", "ratings-v2"), ("destination_workload", "redis-v1")];
    let dst = [("reporter", "destination"), ("source_workload", "ratings-v2"), ("destination_version", "v1")];
    let agree = |t_src: &str, t_dst: &str| {
        let closed = sum(t_src, CLOSED, &src);
        closed >= at_least
            && [OPENED, CLOSED].iter().all(|m| sum(t_src, m, &src) == closed && sum(t_dst, m, &dst) == closed)
            && [RECEIVED, SENT]
                .iter()
                .all(|m| sum(t_src, m, &src) == sum(t_dst, m, &dst) && sum(t_src, m, &src) > 0.0)
    };
    let start = Instant::now();
    loop {
        let (t_src, t_dst) = (scrape(node, source), scrape(node, destination));
        if agree(&t_src, &t_dst) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "the reporters never agreed on a finished batch; source:\n{t_src}\ndestination:\n{t_dst}\nclient logs:\n{}",
            podman.logs(client)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// docker/k8s/`file` as podman 4.3 can play it (docker/README.md says why): no `ports:` on
/// containers (podman publishes each on the host, which a given network namespace cannot
/// do), and restartPolicy OnFailure (podman before 4.6 applies the pod's Always to its init
/// containers, so istio-init would run again and again).
fn playable(file: &str, out: &Path) {
    let text = std::fs::read_to_string(repo().join("docker/k8s").join(file)).unwrap();
    let mut docs = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let mut doc: Value = serde::Deserialize::deserialize(doc).unwrap();
        if doc["kind"].as_str() == Some("Deployment") {
            let spec = &mut doc["spec"]["template"]["spec"];
            for list in ["initContainers", "containers"] {
                for c in spec[list].as_sequence_mut().unwrap() {
                    c.as_mapping_mut().unwrap().remove("ports");
                }
            }
            spec.as_mapping_mut().unwrap().insert("restartPolicy".into(), "OnFailure".into());
        }
        docs.push(serde_yaml_ng::to_string(&doc).unwrap());
    }
    std::fs::write(out, docs.join("---\n")).unwrap();
}

#[test]
fn podman_kube_play_runs_the_manifests_with_istio_init_and_the_sidecar_and_both_reporters_agree() {
    let k8s = Manifests::read();
    let (service, vip, port, target_port) = k8s.redis_service();
    let Some(podman) = Podman::available("containers::kube_play", &format!("{vip} {service}\n")) else {
        return;
    };
    podman.build_images();
    let mut node = Node::new();
    let configmap = repo().join("docker/k8s/ringside-config.yaml");
    let mut ips = Vec::new();
    for (file, deployment) in [("redis.yaml", "redis-v1"), ("ratings-v2.yaml", "ratings-v2")] {
        let manifest = podman.dir.join(file);
        playable(file, &manifest);
        // A namespace of podman's own (podman 4.3 cannot put a pod in a given one), which the
        // test then wires to the node as a CNI plugin would.
        podman.run(&[
            "kube",
            "play",
            "--network",
            "none",
            "--configmap",
            configmap.to_str().unwrap(),
            manifest.to_str().unwrap(),
        ]);
        let pod = format!("{deployment}-pod-0");
        let infra = podman.run(&["pod", "inspect", "--format", "{{.InfraContainerID}}", &pod]);
        let pid: u32 = podman.inspect(&infra, "{{.State.Pid}}").parse().unwrap();
        let ns = node.attach(deployment, pid);
        let ip = node.plug(&ns);
        if deployment == "redis-v1" {
            node.service(&vip, port, &ip, target_port);
        }
        // istio-init ran (podman starts the containers only after it succeeded).
        let rules = iptables_save(&ns);
        for rule in [
            "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
            "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
            "-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN",
        ] {
            assert!(rules.lines().any(|l| l == rule), "{deployment}: {rule} in\n{rules}");
        }
        wait_ready(&node.ns, &ip);
        let pid = podman.inspect(&format!("{pod}-ringside"), "{{.State.Pid}}");
        assert_eq!(status_field(&pid, "Uid"), "1337 1337 1337 1337", "{deployment}: runAsUser");
        ips.push(ip);
    }
    let (redis_ip, ratings_ip) = (&ips[0], &ips[1]);

    // ratings-v2 pings redis, then runs redis-benchmark every 10 s (a batch: the ping, the
    // benchmark's own connection, 4 for SET, 4 for GET).
    wait_for_a_finished_batch(&podman, &node.ns, ratings_ip, redis_ip, 10.0, "ratings-v2-pod-0-ratings");
    let logs = podman.logs("ratings-v2-pod-0-ratings");
    assert!(logs.contains("PONG") && logs.contains("SET: ") && logs.contains("GET: "), "{logs}");
}

/// The local image that stands in for compose's `image` (built by build-local.sh --workloads).
fn stand_in(image: &str) -> &str {
    if image.starts_with("prom/prometheus:") { "localhost/prometheus:debian" } else { image }
}

/// Each service of compose.yaml, in its order, as `podman run` with its image (a stand-in
/// where it names a registry's), command, volumes, and network: its fixed address on `mesh`
/// (a bridge in the node) or `network_mode: service:NAME` (that service's namespace). Not
/// done: `ports` (publishing 9090 on the host; the test reaches Prometheus at its mesh
/// address), `build` (the image is built already), `labels`.
#[test]
fn compose_services_run_as_compose_yaml_defines_them_and_prometheus_scrapes_both_reporters() {
    let compose: Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(repo().join("docker/compose.yaml")).unwrap())
            .unwrap();
    let Some(podman) = Podman::available("containers::compose", "") else {
        return;
    };
    podman.build_images();
    // compose's network `mesh`: a bridge with the subnet's first address, as podman and
    // Docker make it; each service with an address is a pod (a network namespace of its own).
    let subnet = s(&compose["networks"]["mesh"]["ipam"]["config"][0]["subnet"]).to_string();
    let (net, prefix) = subnet.split_once('/').unwrap();
    let gateway = format!("{}.1", net.rsplit_once('.').unwrap().0);
    let mut node = Node::new();
    node.bridge(&format!("{gateway}/{prefix}"));
    let mut pods: Vec<(String, String, String)> = Vec::new(); // service, namespace, address
    let id = std::process::id();
    let services = compose["services"].as_mapping().unwrap();
    for (name, svc) in services {
        let name = s(name);
        for dep in Manifests::strings(&svc["depends_on"]) {
            assert!(
                podman.output(&["container", "exists", &format!("{dep}-{id}")]).status.success(),
                "{name} after {dep}"
            );
        }
        let ns = match (svc["networks"]["mesh"]["ipv4_address"].as_str(), svc["network_mode"].as_str()) {
            (Some(ip), None) => {
                let ns = node.pod(name);
                node.join_bridge(&ns, &format!("{ip}/{prefix}"), &gateway);
                pods.push((name.to_string(), ns.clone(), ip.to_string()));
                ns
            }
            (None, Some(mode)) => {
                let of = mode.strip_prefix("service:").expect("network_mode service:NAME");
                pods.iter().find(|p| p.0 == of).expect("the service it shares").1.clone()
            }
            other => panic!("{name}: {other:?}"),
        };
        let container = format!("{name}-{id}");
        let network = format!("ns:/run/netns/{ns}");
        let volumes: Vec<String> = Manifests::strings(&svc["volumes"])
            .iter()
            .map(|v| {
                let local = v.strip_prefix("./").expect("a path relative to docker/");
                repo().join("docker").join(local).display().to_string()
            })
            .collect();
        let mut args = vec!["run", "-d", "--name", &container, "--network", &network];
        for v in &volumes {
            args.extend(["--volume", v]);
        }
        args.push(stand_in(s(&svc["image"])));
        let command = Manifests::strings(&svc["command"]);
        args.extend(command.iter().map(String::as_str));
        podman.run(&args);
    }
    let address = |svc: &str| pods.iter().find(|p| p.0 == svc).unwrap().2.clone();
    let (redis, ratings, prometheus) = (address("redis"), address("ratings"), address("prometheus"));

    // ratings' redis-benchmark batches go through both sidecars.
    wait_for_a_finished_batch(&podman, &node.ns, &ratings, &redis, 9.0, &format!("ratings-{id}"));

    // Prometheus (its job from prometheus.yml) has scraped both reporters.
    let api: SocketAddr = format!("{prometheus}:9090").parse().unwrap();
    for reporter in ["source", "destination"] {
        let query = format!(
            "istio_tcp_connections_closed_total{{job=\"istio-mesh\",reporter=\"{reporter}\",source_workload=\"ratings-v2\",destination_workload=\"redis-v1\"}}"
        );
        let path = format!("/api/v1/query?query={}", common::url_encode(&query));
        let start = Instant::now();
        loop {
            let answer = http_in(&node.ns, api, &path).map(|(_, body)| body).unwrap_or_default();
            let json: serde_json::Value = serde_json::from_str(&answer).unwrap_or_default();
            let value = json["data"]["result"][0]["value"][1].as_str().and_then(|v| v.parse::<f64>().ok());
            if value.is_some_and(|v| v >= 9.0) {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(60), "Prometheus never had {query}: {answer}");
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}
