//! Envoy's admin API as Istio's pilot-agent reads it (SPEC §10): `/stats` with Envoy's names
//! (`server.state`, `listener_manager.*`, `cluster_manager.*`, per-listener
//! `downstream_cx_active`), `usedonly` and `filter=REGEX`; `/server_info`; and
//! `/drain_listeners`' query flags. The values come from the proxy's shared state; the
//! text formats are Envoy's.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::config::Bind;
use crate::worker::Shared;

/// Envoy's `server.state` (`envoy.admin.v3.ServerInfo.State`); its PRE_INITIALIZING (2)
/// never shows: the admin listener starts with the workers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerState {
    /// Serving.
    Live = 0,
    /// A drain was asked for.
    Draining = 1,
    /// Waiting for workers, or for the first xDS resources of each type.
    Initializing = 3,
}

impl ServerState {
    /// What `/server_info`'s `state` says.
    pub fn name(self) -> &'static str {
        match self {
            ServerState::Live => "LIVE",
            ServerState::Draining => "DRAINING",
            ServerState::Initializing => "INITIALIZING",
        }
    }
}

/// The state now: DRAINING once a drain was asked for (never back to INITIALIZING), else
/// LIVE once every worker started and xDS (when configured) has sent each type once.
pub fn server_state(shared: &Shared) -> ServerState {
    let draining = shared.draining.load(Ordering::Acquire) || shared.drain_announced.load(Ordering::Acquire);
    let started = shared.workers_started.load(Ordering::Acquire) == shared.workers;
    let synced = shared.xds_synced();
    match (draining, started && synced) {
        (true, _) => ServerState::Draining,
        (false, true) => ServerState::Live,
        (false, false) => ServerState::Initializing,
    }
}

/// Every stat ringside keeps under Envoy's name, sorted by name.
pub fn stats(shared: &Shared) -> Vec<(String, u64)> {
    let state = server_state(shared);
    let published = shared.published.load();
    // Index 0 is Cluster, 1 Listener (`xds::Status`).
    let xds = |counts: Option<&[AtomicU64; 4]>, i: usize| counts.map_or(0, |c| c[i].load(Ordering::Relaxed));
    let applied = shared.xds.as_ref().map(|x| &x.applied);
    let rejected = shared.xds.as_ref().map(|x| &x.rejected);
    let started = shared.workers_started.load(Ordering::Acquire) == shared.workers;
    let mut out: Vec<(String, u64)> = vec![
        ("server.state".into(), state as u64),
        ("server.live".into(), u64::from(state == ServerState::Live)),
        ("server.uptime".into(), shared.started.elapsed().as_secs()),
        ("server.concurrency".into(), shared.workers as u64),
        ("listener_manager.workers_started".into(), u64::from(started)),
        ("listener_manager.total_listeners_active".into(), published.config.listeners.len() as u64),
        ("cluster_manager.cds.update_success".into(), xds(applied, 0)),
        ("cluster_manager.cds.update_rejected".into(), xds(rejected, 0)),
        ("listener_manager.lds.update_success".into(), xds(applied, 1)),
        ("listener_manager.lds.update_rejected".into(), xds(rejected, 1)),
        ("cluster_manager.active_clusters".into(), published.config.clusters.len() as u64),
    ];
    for (l, live) in published.config.listeners.iter().zip(&published.live) {
        // Envoy names a listener's stats by its address: `listener.0.0.0.0_15006.*`.
        let name = format!("listener.{}_{}.downstream_cx_active", l.listen.ip(), l.listen.port());
        out.push((name, live.load(Ordering::Relaxed) as u64));
    }
    out.sort();
    out
}

/// `GET /stats[?usedonly][&filter=REGEX]` as Envoy writes it: `name: value` lines. Every stat
/// ringside keeps counts as used. The regex comes unescaped or percent-encoded, as
/// pilot-agent and curl send it; a bad one is an error naming it (a 400).
pub fn render_stats(stats: &[(String, u64)], query: &str) -> Result<String, String> {
    let filter = match param(query, "filter") {
        Some(f) => Some(regex::Regex::new(&f).map_err(|e| format!("invalid regex {f:?}: {e}"))?),
        None => None,
    };
    let mut out = String::new();
    for (name, value) in stats {
        if filter.as_ref().is_none_or(|r| r.is_match(name)) {
            out.push_str(&format!("{name}: {value}\n"));
        }
    }
    Ok(out)
}

/// `GET /server_info`: Envoy's JSON fields pilot-agent and operators read.
pub fn server_info(shared: &Shared) -> String {
    let c = &shared.config;
    let uptime = shared.started.elapsed().as_secs();
    let admin = match c.admin.listen {
        Bind(Some(a)) => a.to_string(),
        Bind(None) => String::new(),
    };
    let info = serde_json::json!({
        "version": format!("ringside/{}", env!("CARGO_PKG_VERSION")),
        "state": server_state(shared).name(),
        "hot_restart_version": "disabled",
        "uptime_current_epoch": format!("{uptime}s"),
        "uptime_all_epochs": format!("{uptime}s"),
        "command_line_options": {
            "concurrency": shared.workers,
            "drain_time": format!("{}s", c.drain_timeout.0.as_secs()),
            "admin_address": admin,
            "args": c.command_line,
        },
        "node": c.xds.as_ref().and_then(|x| x.bootstrap_node.clone()),
    });
    serde_json::to_string_pretty(&info).unwrap_or_default() + "\n"
}

/// `POST /drain_listeners[?inboundonly][&graceful][&skip_exit]`, as Envoy: without
/// `graceful` the listeners (only the inbound ones with `inboundonly`) stop accepting at once;
/// with it they keep accepting for the drain time (`--drain-time-s`), then stop. Live
/// connections go on either way. ringside never exits on a drain, so `skip_exit` changes
/// nothing: pilot-agent ends the process itself.
pub fn drain_listeners(shared: &Arc<Shared>, query: &str) -> String {
    let inbound_only = param(query, "inboundonly").is_some();
    let graceful = param(query, "graceful").is_some();
    shared.drain_announced.store(true, Ordering::Release);
    let stop = move |shared: &Shared| match inbound_only {
        true => shared.inbound_drained.store(true, Ordering::Release),
        false => shared.draining.store(true, Ordering::Release),
    };
    let which = if inbound_only { "inbound listeners" } else { "listeners" };
    if !graceful {
        stop(shared);
        log::info!("drain_listeners: {which} stop accepting");
        return "OK\n".into();
    }
    let wait: Duration = shared.config.drain_timeout.0;
    log::info!("drain_listeners: {which} keep accepting for {}s, then stop", wait.as_secs());
    let shared = shared.clone();
    let timer = std::thread::Builder::new().name("ringside-drain".into()).spawn(move || {
        std::thread::sleep(wait); // the drain period itself, not a synchronisation
        stop(&shared);
        log::info!("drain_listeners: drain time over; {which} stop accepting");
    });
    match timer {
        Ok(_) => "OK\n".into(),
        Err(e) => format!("cannot start the drain timer: {e}\n"),
    }
}

/// A query parameter's value, percent-decoded (`Some("")` for a bare flag).
fn param(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == key).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        match (b, hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(decoded)) => {
                out.push(decoded);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<(String, u64)> {
        [
            ("cluster_manager.cds.update_rejected", 0),
            ("cluster_manager.cds.update_success", 2),
            ("listener.0.0.0.0_15006.downstream_cx_active", 3),
            ("listener_manager.lds.update_success", 1),
            ("listener_manager.workers_started", 1),
            ("server.state", 0),
        ]
        .into_iter()
        .map(|(n, v)| (n.to_string(), v))
        .collect()
    }

    #[test]
    fn pilot_agents_readiness_query_gets_exactly_server_state_and_workers_started() {
        // As pilot-agent sends it: the regex unescaped in the query.
        let q = r"usedonly&filter=^(server\.state|listener_manager\.workers_started)";
        assert_eq!(
            render_stats(&sample(), q).unwrap(),
            "listener_manager.workers_started: 1\nserver.state: 0\n"
        );
        // Percent-encoded, as a browser or curl --data-urlencode sends it.
        let q = "usedonly&filter=%5E%28server%5C.state%7Clistener_manager%5C.workers_started%29";
        assert_eq!(
            render_stats(&sample(), q).unwrap(),
            "listener_manager.workers_started: 1\nserver.state: 0\n"
        );
    }

    #[test]
    fn the_update_and_active_connection_queries_of_pilot_agent_match_envoys_names() {
        let q = r"usedonly&filter=^(cluster_manager\.cds|listener_manager\.lds)\.(update_success|update_rejected)$";
        assert_eq!(
            render_stats(&sample(), q).unwrap(),
            "cluster_manager.cds.update_rejected: 0\ncluster_manager.cds.update_success: 2\n\
             listener_manager.lds.update_success: 1\n"
        );
        let q = "usedonly&filter=downstream_cx_active$";
        assert_eq!(render_stats(&sample(), q).unwrap(), "listener.0.0.0.0_15006.downstream_cx_active: 3\n");
        assert_eq!(render_stats(&sample(), "").unwrap().lines().count(), 6);
    }

    #[test]
    fn a_bad_filter_is_an_error_naming_it() {
        let e = render_stats(&sample(), "filter=(unclosed").unwrap_err();
        assert!(e.contains("invalid regex \"(unclosed\""), "{e}");
    }

    #[test]
    fn percent_decoding_leaves_a_broken_escape_as_it_is() {
        assert_eq!(percent_decode("a%2Eb%zz%4"), "a.b%zz%4");
    }
}
