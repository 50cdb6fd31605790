//! SPEC §4: bad config and flags get a one-line error naming the file, line and key, and
//! exit 64; never a panic.

mod common;

use common::run_to_end as ringside;
use std::process::Command;

const GOOD: &str = "\
node: {workload_name: ratings-v2, namespace: default, labels: {app: ratings, version: v2}}
workers: 1
metrics: {listen: 127.0.0.1:0}
listeners:
  - name: outbound-mongodb
    listen: 127.0.0.1:15001
    direction: outbound
    peer_exchange: always
    cluster: mongodb
clusters:
  - name: mongodb
    service: mongodb.default.svc.cluster.local
    endpoints:
      - {address: 127.0.0.1:27017, labels: {version: v1}}
";

/// Write `yaml` to a temp file and run `validate` on it.
fn validate(name: &str, yaml: &str) -> (i32, String, String) {
    let path = std::env::temp_dir().join(format!("ringside-cfg-{}-{name}.yaml", std::process::id()));
    std::fs::write(&path, yaml).unwrap();
    let p = path.display().to_string();
    let (code, err) = ringside(&["validate", "--config", &p]);
    (code, err, p)
}

/// Assert exit 64 and a single `ringside: ...` line containing every fragment.
fn assert_usage_error(code: i32, err: &str, fragments: &[&str]) {
    assert_eq!(code, 64, "exit code; stderr: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {err}");
    assert!(lines[0].starts_with("ringside: "), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    for f in fragments {
        assert!(err.contains(f), "{f:?} not in {err:?}");
    }
}

#[test]
fn a_good_config_validates() {
    let (code, err, _) = validate("good", GOOD);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn a_capture_listener_needs_no_cluster() {
    let yaml = GOOD.replace("    cluster: mongodb\n", "    capture: outbound\n");
    let (code, err, _) = validate("capture", &yaml);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn the_spec_example_validates_up_to_its_certificate_files_which_are_not_here() {
    // Every key is implemented; `validate` loads the mTLS files as `run` would (SPEC §7), and
    // the example's relative `certs/cert-chain.pem` does not exist: a one-line error naming it.
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/spec-example.yaml"))
        .unwrap();
    let (code, err, _) = validate("spec", &text);
    assert_usage_error(code, &err, &["certs/cert-chain.pem"]);
}

/// (name, how to break GOOD, fragments the error must contain; `FILE` stands for the path)
const BAD: &[(&str, &str, &str, &[&str])] = &[
    ("unknown-top-key", "workers: 1", "wokers: 1", &["FILE:2:", "unknown field `wokers`"]),
    (
        "unknown-listener-key",
        "    peer_exchange: always",
        "    peer_exchange: always\n    colour: red",
        &["FILE:9:", "unknown field `colour`"],
    ),
    ("bad-address", "listen: 127.0.0.1:15001", "listen: 127.0.0.1", &["FILE:6:", "invalid socket address"]),
    ("bad-endpoint-address", "127.0.0.1:27017", "localhost:27017", &["FILE:14:", "invalid socket address"]),
    (
        "bad-duration",
        "workers: 1",
        "workers: 1\ndrain_timeout: 5 seconds",
        &["FILE:3:", "bad duration \"5 seconds\""],
    ),
    (
        "bad-size",
        "    cluster: mongodb\n",
        "    cluster: mongodb\n    limits: {max_preamble: 64KB}\n",
        &["FILE:10:", "bad size \"64KB\""],
    ),
    (
        "bad-direction",
        "direction: outbound",
        "direction: sideways",
        &["FILE:7:", "unknown variant `sideways`"],
    ),
    (
        "bad-peer-exchange",
        "peer_exchange: always",
        "peer_exchange: sometimes",
        &["FILE:8:", "unknown variant `sometimes`"],
    ),
    (
        "missing-cluster",
        "    cluster: mongodb\n",
        "    cluster: postgres\n",
        &["FILE:9:", "cluster \"postgres\" is not defined"],
    ),
    (
        "no-endpoints",
        "    endpoints:\n      - {address: 127.0.0.1:27017, labels: {version: v1}}\n",
        "    endpoints: []\n",
        &["cluster mongodb: endpoints: at least one endpoint"],
    ),
    (
        "missing-target",
        "    cluster: mongodb\n",
        "\n",
        &["listener outbound-mongodb: needs one of cluster, tcp_routes, service"],
    ),
    (
        "zero-weights",
        "    cluster: mongodb\n",
        "    tcp_routes: [{cluster: mongodb, weight: 0}]\n",
        &["tcp_routes: weights add up to zero"],
    ),
    (
        "negative-weight",
        "    cluster: mongodb\n",
        "    tcp_routes: [{cluster: mongodb, weight: -5}, {cluster: mongodb, weight: 5}]\n",
        &["tcp_routes: negative weight -5"],
    ),
    (
        "unknown-subset",
        "    cluster: mongodb\n",
        "    tcp_routes: [{cluster: mongodb, subset: v9, weight: 5}]\n",
        &["cluster mongodb has no subset \"v9\""],
    ),
    ("zero-workers", "workers: 1", "workers: 0", &["FILE:2:", "workers: must be at least 1"]),
    (
        "busy-poll-too-long",
        "workers: 1",
        "workers: 1\nbusy_poll: 20ms",
        &["FILE:3:", "busy_poll: at most 10ms (0s turns it off)"],
    ),
    ("busy-poll-no-unit", "workers: 1", "workers: 1\nbusy_poll: 50", &["FILE:3:", "bad duration \"50\""]),
    ("yaml-syntax", "listeners:", "listeners: [", &["FILE:"]),
    (
        "huge-label-budget",
        "metrics: {listen: 127.0.0.1:0}",
        "metrics: {listen: 127.0.0.1:0, max_label_sets: 18446744073709551615}",
        &["FILE:3:", "metrics.max_label_sets: must be between 1 and 1000000"],
    ),
    (
        "capture-outbound-with-a-cluster",
        "    cluster: mongodb",
        "    cluster: mongodb\n    capture: outbound",
        &["FILE:5:", "routes by each connection's original destination"],
    ),
    (
        "capture-against-direction",
        "    peer_exchange: always",
        "    peer_exchange: always\n    capture: inbound",
        &["FILE:5:", "capture: inbound needs direction: inbound"],
    ),
];

#[test]
fn bad_configs_get_one_line_naming_file_line_and_key_and_exit_64() {
    for (name, from, to, fragments) in BAD {
        assert!(GOOD.contains(from), "{name}: GOOD lacks {from:?}");
        let (code, err, path) = validate(name, &GOOD.replacen(from, to, 1));
        let fragments: Vec<String> = fragments.iter().map(|f| f.replace("FILE", &path)).collect();
        let fragments: Vec<&str> = fragments.iter().map(|s| s.as_str()).collect();
        assert_usage_error(code, &err, &fragments);
    }
}

#[test]
fn duplicate_listener_names_and_addresses_are_errors() {
    let two = |second: &str| GOOD.replace("clusters:", &format!("  - {second}\nclusters:"));
    let (code, err, path) = validate(
        "dup-name",
        &two("{name: outbound-mongodb, listen: 127.0.0.1:15002, direction: outbound, cluster: mongodb}"),
    );
    assert_usage_error(code, &err, &[&path, "listener outbound-mongodb: duplicate listener name"]);
    let (code, err, _) = validate(
        "dup-addr",
        &two("{name: other, listen: 127.0.0.1:15001, direction: outbound, cluster: mongodb}"),
    );
    assert_usage_error(code, &err, &["listener other: listen 127.0.0.1:15001: address already used"]);
}

#[test]
fn listeners_that_would_share_a_port_are_errors_even_through_the_wildcard_address() {
    let (_, _, path) = validate("overlap", GOOD);
    let (code, err) = ringside(&["validate", "--config", &path, "--metrics", "0.0.0.0:15001"]);
    assert_usage_error(
        code,
        &err,
        &["listener outbound-mongodb: listen 127.0.0.1:15001: address already used", "0.0.0.0:15001"],
    );
    let (code, err) =
        ringside(&["validate", "--config", &path, "--admin", "127.0.0.1:15555", "--health", "0.0.0.0:15555"]);
    assert_usage_error(code, &err, &["health.listen 0.0.0.0:15555: overlaps admin.listen 127.0.0.1:15555"]);
}

#[test]
fn a_missing_config_file_is_named() {
    let (code, err) = ringside(&["validate", "--config", "/nonexistent/ringside.yaml"]);
    assert_usage_error(code, &err, &["/nonexistent/ringside.yaml", "cannot read"]);
}

#[test]
fn bad_flags_get_one_line_and_exit_64() {
    let cases: &[(&[&str], &str)] = &[
        (&["run", "--listen", "127.0.0.1:1"], "--upstream is required"),
        (&["run", "--listen", "127.0.0.1:1", "--upstream", "127.0.0.1:2"], "--direction is required"),
        (&["run", "--listen", "nowhere", "--upstream", "127.0.0.1:2"], "invalid value 'nowhere'"),
        (
            &[
                "run",
                "--listen",
                "127.0.0.1:1",
                "--upstream",
                "127.0.0.1:2",
                "--direction",
                "outbound",
                "--label",
                "novalue",
            ],
            "--label \"novalue\": want KEY=VALUE",
        ),
        (&["run", "--driver", "fast"], "unknown variant `fast`"),
        (&["run", "--tcp-reporting-duration", "soon"], "bad duration"),
        (&["run", "--metrics", "everywhere"], "bad address"),
        (
            &[
                "run",
                "--listen",
                "127.0.0.1:1",
                "--upstream",
                "127.0.0.1:2",
                "--direction",
                "outbound",
                "--workers",
                "0",
            ],
            "workers: must be at least 1",
        ),
        (
            &[
                "run",
                "--listen",
                "127.0.0.1:1",
                "--upstream",
                "127.0.0.1:2",
                "--direction",
                "outbound",
                "--busy-poll",
                "1h",
            ],
            "busy_poll: at most 10ms",
        ),
        (&["run", "--busy-poll", "fast"], "bad duration"),
        (&["run", "--bogus"], "unexpected argument '--bogus'"),
        (&["frobnicate"], "unrecognized subcommand"),
    ];
    for (args, fragment) in cases {
        let (code, err) = ringside(args);
        assert_usage_error(code, &err, &[fragment]);
    }
}

#[test]
fn flags_override_the_file() {
    let path = std::env::temp_dir().join(format!("ringside-cfg-{}-override.yaml", std::process::id()));
    std::fs::write(&path, GOOD).unwrap();
    let p = path.display().to_string();
    // The file's single listener gets the flag's direction; a bad flag value still fails.
    let (code, err) = ringside(&["validate", "--config", &p, "--direction", "inbound", "--workers", "3"]);
    assert_eq!(code, 0, "{err}");
    let (code, err) = ringside(&["validate", "--config", &p, "--idle-timeout", "0s"]);
    assert_usage_error(code, &err, &["limits.idle_timeout: must be positive"]);
}

#[test]
fn version_prints_the_crate_version() {
    let out = Command::new(common::bin()).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("ringside {}", env!("CARGO_PKG_VERSION"))
    );
}

/// `ringside --help | head -1`: stdout's reader is gone before the binary writes. Rust
/// ignores SIGPIPE, so a `print!` there panics (and aborts: panic = "abort"); the output is
/// the reader's to cut short, so each printing command still exits 0 with nothing on stderr.
#[test]
fn a_closed_stdout_is_not_a_crash() {
    let (_, _, path) = validate("closed-stdout", GOOD);
    for args in [vec!["--help"], vec!["validate", "--config", &path], vec!["iptables", "--print"]] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = Command::new(common::bin()).args(&args).stdout(writer).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {:?}, stderr: {err}", out.status);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}
