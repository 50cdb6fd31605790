//! `ringside demo`: two sidecars in one process (ratings-v2 outbound → mongodb-v1 inbound, as
//! in Istio's TCP metrics task), a built-in TCP service, bounded traffic, and the resulting
//! istio_tcp_* series printed like a Prometheus console table.

use std::error::Error;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use crate::config::{Bind, Cluster, Config, Direction, Endpoint, Listener, LoadBalancer, Node, PeerExchange};
use crate::worker::{self, Proxy};

/// `println!` that stops quietly when stdout's reader has gone (`ringside demo | head`).
macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// Run the demo with `connections` request/response connections.
pub fn run(connections: usize) -> Result<(), Box<dyn Error>> {
    let service = spawn_hello_service()?;
    say!("tcp service (answers each line L with \"hello L\") on {service}");
    let inbound = worker::start(sidecar(
        node("mongodb-v1", &[("app", "mongodb"), ("version", "v1")]),
        Direction::Inbound,
        service,
    ))?;
    let inbound_addr = inbound.shared.config.listeners[0].listen;
    say!("sidecar mongodb-v1 (inbound, reporter=destination) on {inbound_addr}");
    let outbound = worker::start(sidecar(
        node("ratings-v2", &[("app", "ratings"), ("version", "v2")]),
        Direction::Outbound,
        inbound_addr,
    ))?;
    let outbound_addr = outbound.shared.config.listeners[0].listen;
    say!("sidecar ratings-v2 (outbound, reporter=source) on {outbound_addr}");

    for i in 0..connections {
        let mut s = TcpStream::connect(outbound_addr)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"world\n")?;
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line)?;
        if line != "hello world\n" {
            return Err(format!("connection {i}: got {line:?}, want \"hello world\\n\"").into());
        }
    }
    say!(
        "{connections} connections: each sent \"world\\n\" (6 bytes) and got \"hello world\\n\" (12 bytes)\n"
    );

    // Closing is counted when each sidecar sees the close; wait for it, bounded.
    let deadline = Instant::now() + Duration::from_secs(5);
    let closed = |p: &Proxy| total(&p.shared.render(), "istio_tcp_connections_closed_total");
    while (closed(&outbound) < connections as f64 || closed(&inbound) < connections as f64)
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut text = outbound.shared.render();
    text.push_str(&inbound.shared.render());
    print_table(&text);
    for p in [&outbound, &inbound] {
        p.shared.terminate();
    }
    outbound.join();
    inbound.join();
    Ok(())
}

fn node(workload: &str, labels: &[(&str, &str)]) -> Node {
    Node {
        workload_name: workload.into(),
        namespace: "default".into(),
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ..Node::default()
    }
}

fn sidecar(node: Node, direction: Direction, upstream: SocketAddr) -> Config {
    let service = "mongodb.default.svc.cluster.local".to_string();
    let mut cfg = Config {
        node,
        workers: Some(1),
        listeners: vec![std::sync::Arc::new(Listener {
            name: format!("{direction:?}").to_lowercase(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            direction,
            peer_exchange: PeerExchange::Always,
            cluster: Some("mongodb".into()),
            tcp_routes: None,
            service: None,
            capture: Default::default(),
            limits: Default::default(),
            tls: None,
            istio_stats: true,
            source: None,
            filter_chains: Vec::new(),
            tunnel: None,
            access_log: None,
        })],
        clusters: [std::sync::Arc::new(Cluster {
            name: "mongodb".into(),
            service: Some(service),
            service_namespace: None,
            load_balancer: LoadBalancer::RoundRobin,
            addresses: Vec::new(),
            endpoints: std::sync::Arc::new(vec![Endpoint::at(upstream)]),
            subsets: vec![],
            tls: None,
            service_port: None,
            original_dst: false,
            bind_source: None,
            source: None,
            tunnel: None,
        })]
        .into_iter()
        .collect(),
        ..Config::default()
    };
    cfg.metrics.listen = Bind(None);
    cfg.admin.listen = Bind(None);
    cfg.health.listen = Bind(None);
    cfg.validate("demo", "").expect("the demo config is valid");
    cfg
}

fn spawn_hello_service() -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut reader = BufReader::new(match s.try_clone() {
                    Ok(r) => r,
                    Err(_) => return,
                });
                let mut w = s;
                let mut line = String::new();
                while matches!(reader.read_line(&mut line), Ok(n) if n > 0) {
                    if w.write_all(format!("hello {line}").as_bytes()).is_err() {
                        return;
                    }
                    line.clear();
                }
                let _ = reader.read_to_end(&mut Vec::new());
            });
        }
    });
    Ok(addr)
}

/// One exposition line: name, labels, value.
type Sample<'a> = (&'a str, Vec<(&'a str, &'a str)>, f64);

/// Parse one exposition line `name{k="v",...} value`.
fn parse_line(line: &str) -> Option<Sample<'_>> {
    let (series, value) = line.rsplit_once(' ')?;
    let value = value.parse().ok()?;
    let Some((name, rest)) = series.split_once('{') else {
        return Some((series, vec![], value));
    };
    let labels = rest
        .trim_end_matches('}')
        .split("\",")
        .filter_map(|kv| kv.split_once("=\"").map(|(k, v)| (k, v.trim_end_matches('"'))))
        .collect();
    Some((name, labels, value))
}

fn total(text: &str, metric: &str) -> f64 {
    text.lines().filter_map(parse_line).filter(|(n, _, _)| *n == metric).map(|(_, _, v)| v).sum()
}

fn print_table(text: &str) {
    let columns = [
        "reporter",
        "source_workload",
        "source_version",
        "destination_workload",
        "destination_version",
        "destination_service",
        "response_flags",
    ];
    let mut rows = vec![{
        let mut h = vec!["metric".to_string()];
        h.extend(columns.iter().map(|c| c.to_string()));
        h.push("value".into());
        h
    }];
    let mut samples: Vec<Sample> =
        text.lines().filter_map(parse_line).filter(|s| s.0.starts_with("istio_tcp_")).collect();
    // Sort as a console would: source side first, then by metric and labels.
    samples.sort_by(|a, b| (b.1.first(), a.0, &a.1).cmp(&(a.1.first(), b.0, &b.1)));
    for (name, labels, value) in samples {
        let mut row = vec![name.to_string()];
        for c in columns {
            row.push(labels.iter().find(|(k, _)| *k == c).map_or("", |(_, v)| v).to_string());
        }
        row.push(value.to_string());
        rows.push(row);
    }
    let widths: Vec<usize> =
        (0..rows[0].len()).map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0)).collect();
    for r in &rows {
        let cells: Vec<String> = r.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        say!("{}", cells.join("  ").trim_end());
    }
}
