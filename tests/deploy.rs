//! docker/: the image, the compose demo and the Kubernetes manifests are checked by the tools
//! their users would run (hadolint, promtool, kubernetes-validate with Kubernetes' own
//! schemas, `ringside validate` on every ringside config they mount), and for what ties them
//! together (addresses, ports, probes, uid 1337). tests/deps.sh installs the tools.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_yaml_ng::Value;

fn docker(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("docker").join(path)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Runs a tool, panicking with a pointer to tests/deps.sh when it is not installed.
fn tool(program: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e} (tests/deps.sh installs it)"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// `ringside validate` on a config text; returns its one-line answer on failure.
fn ringside_validate(name: &str, yaml: &str) {
    // Unique per call: tests run in parallel and two of them validate a file of the same name.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("ringside-deploy-{}-{n}-{name}", std::process::id()));
    std::fs::write(&path, yaml).unwrap();
    let (ok, text) = tool(env!("CARGO_BIN_EXE_ringside"), &["validate", "--config", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);
    assert!(ok, "{name}: {text}");
}

fn yaml(text: &str) -> Value {
    serde_yaml_ng::from_str(text).unwrap()
}

fn yaml_docs(text: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text).map(|d| serde::Deserialize::deserialize(d).unwrap()).collect()
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v:?}"))
}

#[test]
fn the_dockerfile_passes_hadolint() {
    let (ok, text) = tool("hadolint", &[docker("Dockerfile").to_str().unwrap()]);
    assert!(ok, "hadolint:\n{text}");
}

#[test]
fn the_istio_proxy_image_puts_ringside_where_binary_path_names_it_beside_istios_agent() {
    let path = docker("Dockerfile.istio-proxy");
    let (ok, text) = tool("hadolint", &[path.to_str().unwrap()]);
    assert!(ok, "hadolint:\n{text}");
    let text = read(&path);
    let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    let froms: Vec<&&str> = lines.iter().filter(|l| l.starts_with("FROM ")).collect();
    assert!(froms.last().is_some_and(|f| f.starts_with("FROM docker.io/istio/proxyv2:")), "{froms:?}");
    assert!(
        lines.contains(&"COPY --from=ringside /usr/local/bin/ringside /usr/local/bin/ringside"),
        "{lines:?}"
    );
    assert!(text.contains("binaryPath\": \"/usr/local/bin/ringside"), "the annotation it is for");
}

#[test]
fn the_image_is_multi_stage_from_scratch_runs_as_1337_and_exposes_istios_ports() {
    let text = read(&docker("Dockerfile"));
    let lines: Vec<&str> =
        text.lines().map(str::trim).filter(|l| !l.starts_with('#') && !l.is_empty()).collect();
    let froms: Vec<&&str> = lines.iter().filter(|l| l.starts_with("FROM ")).collect();
    assert!(froms.len() >= 2, "multi-stage: {froms:?}");
    assert_eq!(**froms.last().unwrap(), "FROM scratch", "small final image");
    let final_stage = &lines[lines.iter().position(|l| *l == "FROM scratch").unwrap()..];
    assert!(final_stage.contains(&"USER 1337:1337"), "{final_stage:?}");
    assert!(!final_stage.iter().any(|l| l.starts_with("USER root") || l.starts_with("USER 0")));
    assert!(!final_stage.iter().any(|l| l.starts_with("RUN ")), "scratch has no shell");
    let expose = final_stage.iter().find(|l| l.starts_with("EXPOSE ")).expect("EXPOSE");
    for port in ["15001", "15006", "15000", "15021", "15090"] {
        assert!(expose.split(' ').any(|p| p == port), "{port} in {expose}");
    }
    // The build context is the repository root: target/ must stay out of it.
    let ignore = read(&docker("Dockerfile.dockerignore"));
    assert!(ignore.lines().any(|l| l == "*") && ignore.contains("!src/"), "{ignore}");
    for copied in
        final_stage.iter().chain(lines.iter()).filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let src = copied.split(' ').nth(1).unwrap();
        assert!(Path::new(env!("CARGO_MANIFEST_DIR")).join(src).exists(), "{copied}");
        assert!(
            ignore.contains(&format!("!{}", src.trim_end_matches('/'))),
            "{src} not let through the ignore file"
        );
    }
}

/// The non-comment lines of each stage of a Dockerfile: (its FROM line, the rest).
fn stages(text: &str) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.starts_with('#') && !l.is_empty()) {
        match out.last_mut() {
            Some((_, lines)) if !line.starts_with("FROM ") => lines.push(line.to_string()),
            _ => out.push((line.to_string(), Vec::new())),
        }
    }
    out
}

#[test]
fn the_registry_free_dockerfile_passes_hadolint_and_gives_both_images_the_same_layout() {
    let (ok, text) = tool("hadolint", &[docker("Dockerfile.local").to_str().unwrap()]);
    assert!(ok, "hadolint:\n{text}");
    let registry = stages(&read(&docker("Dockerfile")));
    let local = stages(&read(&docker("Dockerfile.local")));
    // What a container sees of each image (user, ports, entry point, command), stage for
    // stage; the local build copies a staged directory instead of building.
    let layout = |(from, lines): &(String, Vec<String>)| {
        let kept: Vec<String> = lines
            .iter()
            .filter(|l| ["USER ", "EXPOSE ", "ENTRYPOINT ", "CMD "].iter().any(|k| l.starts_with(k)))
            .cloned()
            .collect();
        (from.ends_with(" AS init"), kept)
    };
    let init = |stages: &[(String, Vec<String>)]| {
        stages.iter().find(|s| s.0.ends_with(" AS init")).map(layout).expect("an init stage")
    };
    assert_eq!(init(&local), init(&registry));
    assert_eq!(layout(local.last().unwrap()), layout(registry.last().unwrap()));
    assert!(local.iter().all(|(from, _)| from.starts_with("FROM scratch")), "no registry: {local:?}");
    assert!(local.iter().all(|(_, lines)| !lines.iter().any(|l| l.starts_with("RUN "))), "{local:?}");
}

#[test]
fn the_prometheus_config_passes_promtool_and_scrapes_both_sidecars_as_istio_mesh() {
    let path = docker("prometheus.yml");
    let (ok, text) = tool("promtool", &["check", "config", path.to_str().unwrap()]);
    assert!(ok && text.contains("SUCCESS"), "{text}");
    let prom = yaml(&read(&path));
    let job = &prom["scrape_configs"][0];
    assert_eq!(s(&job["job_name"]), "istio-mesh");
    assert_eq!(s(&job["metrics_path"]), "/stats/prometheus");
    let compose = yaml(&read(&docker("compose.yaml")));
    let ip = |svc: &str| s(&compose["services"][svc]["networks"]["mesh"]["ipv4_address"]).to_string();
    let targets: Vec<&str> =
        job["static_configs"].as_sequence().unwrap().iter().map(|c| s(&c["targets"][0])).collect();
    assert_eq!(targets, vec![format!("{}:15090", ip("redis")), format!("{}:15090", ip("ratings"))]);
}

#[test]
fn compose_pairs_each_workload_with_a_sidecar_in_its_network_namespace_and_valid_configs() {
    let compose = yaml(&read(&docker("compose.yaml")));
    let services = &compose["services"];
    for (sidecar, workload, config) in [
        ("redis-sidecar", "redis", "ringside/redis-v1.yaml"),
        ("ratings-sidecar", "ratings", "ringside/ratings-v2.yaml"),
    ] {
        let sc = &services[sidecar];
        assert_eq!(s(&sc["image"]), "ringside:dev");
        assert_eq!(s(&sc["network_mode"]), format!("service:{workload}"), "shares the pod's netns");
        let mount = s(&sc["volumes"][0]);
        assert_eq!(mount, format!("./{config}:/etc/ringside/ringside.yaml:ro"));
        ringside_validate(config.rsplit('/').next().unwrap(), &read(&docker(config)));
    }
    assert_eq!(s(&services["redis"]["labels"]["version"]), "v1");
    assert_eq!(s(&services["ratings"]["labels"]["version"]), "v2");
    assert!(s(&services["prometheus"]["image"]).starts_with("prom/prometheus:"));
    assert_eq!(
        s(&services["prometheus"]["volumes"][0]),
        "./prometheus.yml:/etc/prometheus/prometheus.yml:ro"
    );
    // The client's sidecar goes to the database pod's inbound listener, at its fixed address.
    let outbound = yaml(&read(&docker("ringside/ratings-v2.yaml")));
    let redis_ip = s(&services["redis"]["networks"]["mesh"]["ipv4_address"]);
    assert_eq!(s(&outbound["clusters"][0]["endpoints"][0]["address"]), format!("{redis_ip}:15006"));
    assert_eq!(s(&outbound["node"]["workload_name"]), "ratings-v2");
    let inbound = yaml(&read(&docker("ringside/redis-v1.yaml")));
    assert_eq!(s(&inbound["listeners"][0]["listen"]), "0.0.0.0:15006");
    assert_eq!(s(&inbound["node"]["labels"]["version"]), "v1");
}

fn k8s_files() -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(docker("k8s"))
        .unwrap()
        .flatten()
        .map(|e| e.path().display().to_string())
        .filter(|p| p.ends_with(".yaml"))
        .collect();
    files.sort();
    files
}

/// kubernetes-validate, strict, offline when this process may make a network namespace (its
/// schemas ship in the wheel; `unshare -n` proves it needs no network).
fn kubernetes_validate(files: &[String]) -> (bool, String) {
    let mut args = vec!["-n", "kubernetes-validate", "--strict"];
    args.extend(files.iter().map(String::as_str));
    if Command::new("unshare").args(["-n", "true"]).status().is_ok_and(|s| s.success()) {
        tool("unshare", &args)
    } else {
        tool("kubernetes-validate", &args[2..])
    }
}

#[test]
fn the_kubernetes_manifests_validate_strictly_against_kubernetes_schemas_offline() {
    let files = k8s_files();
    assert!(files.len() >= 3, "{files:?}");
    let (ok, text) = kubernetes_validate(&files);
    assert!(ok, "{text}");
    assert_eq!(text.matches("passed for resource").count(), 6, "{text}");
    // Strict really is strict: an unknown field fails.
    let bad = std::env::temp_dir().join(format!("ringside-k8s-bad-{}.yaml", std::process::id()));
    std::fs::write(&bad, read(Path::new(&files[0])).replace("replicas: 1", "replicas: 1\n  replica: 1"))
        .unwrap();
    let (ok, text) = kubernetes_validate(&[bad.display().to_string()]);
    let _ = std::fs::remove_file(&bad);
    assert!(!ok, "an unknown field must fail strict validation: {text}");
}

#[test]
fn each_deployment_runs_ringside_as_a_probed_non_root_sidecar_with_its_configmap_key() {
    let docs: Vec<Value> = k8s_files().iter().flat_map(|f| yaml_docs(&read(Path::new(f)))).collect();
    let kind = |k: &'static str| docs.iter().filter(move |d| d["kind"].as_str() == Some(k));
    let configmap = kind("ConfigMap").next().expect("ConfigMap");
    let service = kind("Service").next().expect("Service");
    let mut workloads = Vec::new();
    for d in kind("Deployment") {
        let pod = &d["spec"]["template"];
        let spec = &pod["spec"];
        let sidecar = spec["containers"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|c| c["name"].as_str() == Some("ringside"))
            .expect("a ringside container");
        let probe = &sidecar["readinessProbe"]["httpGet"];
        assert_eq!((s(&probe["path"]), probe["port"].as_u64()), ("/healthz/ready", Some(15021)));
        let prom = sidecar["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|p| p["containerPort"].as_u64() == Some(15090));
        assert_eq!(prom.map(|p| s(&p["name"])), Some("http-envoy-prom"));
        assert_eq!(s(&pod["metadata"]["annotations"]["prometheus.io/port"]), "15090");
        assert_eq!(sidecar["securityContext"]["runAsUser"].as_u64(), Some(1337));
        assert_eq!(sidecar["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
        assert!(
            sidecar["resources"]["limits"]["cpu"].is_string()
                && sidecar["resources"]["requests"].is_mapping()
        );
        assert_eq!(s(&sidecar["volumeMounts"][0]["mountPath"]), "/etc/ringside");
        let volume = &spec["volumes"][0]["configMap"];
        assert_eq!(s(&volume["name"]), s(&configmap["metadata"]["name"]));
        assert_eq!(s(&volume["items"][0]["path"]), "ringside.yaml");
        let key = s(&volume["items"][0]["key"]);
        let config_text = s(&configmap["data"][key]);
        ringside_validate(key, config_text);
        let config = yaml(config_text);
        let labels = &pod["metadata"]["labels"];
        assert_eq!(config["node"]["workload_name"], d["metadata"]["name"], "{key} names its workload");
        assert_eq!(config["node"]["labels"]["app"], labels["app"]);
        assert_eq!(config["node"]["labels"]["version"], labels["version"]);
        assert_eq!(s(&config["node"]["service_account"]), s(&spec["serviceAccountName"]));
        workloads.push(s(&d["metadata"]["name"]).to_string());
    }
    workloads.sort();
    assert_eq!(workloads, ["ratings-v2", "redis-v1"]);
    // ratings-v2's app dials the Service's fixed ClusterIP, which its sidecar's capture knows
    // the redis cluster by and dials itself; the Service targets redis' own port, which the
    // database pod's capture takes to its sidecar.
    let ratings = yaml(s(&configmap["data"]["ratings-v2.yaml"]));
    let port = &service["spec"]["ports"][0];
    let cluster_ip = s(&service["spec"]["clusterIP"]);
    let address = format!("{cluster_ip}:{}", port["port"].as_u64().unwrap());
    assert_eq!(s(&ratings["clusters"][0]["addresses"][0]), address);
    assert_eq!(s(&ratings["clusters"][0]["endpoints"][0]["address"]), address);
    assert_eq!(port["targetPort"].as_u64(), Some(6379));
}

/// The capture listeners' ports of a ringside config: (outbound, inbound).
fn capture_ports(config: &Value) -> (Option<u64>, Option<u64>) {
    let port = |mode: &str| {
        config["listeners"].as_sequence()?.iter().find(|l| l["capture"].as_str() == Some(mode)).map(|l| {
            let listen = s(&l["listen"]);
            listen.rsplit(':').next().unwrap().parse::<u64>().unwrap()
        })
    };
    (port("outbound"), port("inbound"))
}

#[test]
fn each_deployment_has_istios_init_container_whose_rules_send_tcp_to_its_sidecars_capture_listeners() {
    let docs: Vec<Value> = k8s_files().iter().flat_map(|f| yaml_docs(&read(Path::new(f)))).collect();
    let configmap = docs.iter().find(|d| d["kind"].as_str() == Some("ConfigMap")).expect("ConfigMap");
    let mut checked = 0;
    for d in docs.iter().filter(|d| d["kind"].as_str() == Some("Deployment")) {
        let name = s(&d["metadata"]["name"]);
        let spec = &d["spec"]["template"]["spec"];
        let inits =
            spec["initContainers"].as_sequence().unwrap_or_else(|| panic!("{name}: no initContainers"));
        let init = inits.iter().find(|c| c["name"].as_str() == Some("istio-init")).expect("istio-init");
        // As Istio's injection template writes istio-init (without CNI).
        let sc = &init["securityContext"];
        let added: Vec<&str> = sc["capabilities"]["add"].as_sequence().unwrap().iter().map(s).collect();
        assert_eq!(added, ["NET_ADMIN", "NET_RAW"], "{name}");
        assert_eq!(sc["capabilities"]["drop"][0].as_str(), Some("ALL"), "{name}");
        assert_eq!(sc["runAsUser"].as_u64(), Some(0), "{name}");
        assert_eq!(sc["runAsNonRoot"].as_bool(), Some(false), "{name}");
        assert_eq!(sc["privileged"].as_bool(), Some(false), "{name}");
        let args: Vec<&str> = init["args"].as_sequence().unwrap().iter().map(s).collect();
        assert_eq!(&args[..2], ["iptables", "--apply"], "{name}");

        // Exactly those arguments, printing instead of applying.
        let mut print: Vec<&str> = args.clone();
        print[1] = "--print";
        let (ok, rules) = tool(env!("CARGO_BIN_EXE_ringside"), &print);
        assert!(ok, "{name}: ringside {print:?}: {rules}");
        let has = |rule: &str| rules.lines().any(|l| l == rule);
        let config = yaml(s(&configmap["data"][s(&spec["volumes"][0]["configMap"]["items"][0]["key"])]));
        let (outbound, inbound) = capture_ports(&config);
        let (outbound, inbound) =
            (outbound.expect("an outbound capture listener"), inbound.expect("an inbound one"));
        assert!(
            has(&format!("iptables -t nat -A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports {outbound}")),
            "{rules}"
        );
        assert!(
            has(&format!("iptables -t nat -A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports {inbound}")),
            "{rules}"
        );
        // Every inbound port is captured, but the sidecar's own ports.
        assert!(has("iptables -t nat -A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT"), "{rules}");
        let sidecar = spec["containers"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|c| c["name"].as_str() == Some("ringside"))
            .unwrap();
        let mut own: Vec<u64> = sidecar["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter_map(|p| p["containerPort"].as_u64())
            .collect();
        own.extend([15000, 15020, 15021, 15090]);
        for port in own {
            assert!(
                has(&format!("iptables -t nat -A ISTIO_INBOUND -p tcp --dport {port} -j RETURN")),
                "{name}: {port} excluded: {rules}"
            );
        }
        // The proxy's own connections (uid and gid 1337, which the sidecar runs as) are never
        // captured again.
        assert_eq!(sidecar["securityContext"]["runAsUser"].as_u64(), Some(1337));
        assert!(has("iptables -t nat -A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN"), "{rules}");
        assert!(has("iptables -t nat -A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN"), "{rules}");
        assert!(has("iptables -t nat -A ISTIO_OUTPUT -j ISTIO_REDIRECT"), "all outbound captured: {rules}");
        checked += 1;
    }
    assert_eq!(checked, 2);
}
