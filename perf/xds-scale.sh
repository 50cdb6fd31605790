#!/usr/bin/env bash
# A mesh of N services, ringside vs Envoy (SPEC §11, issue #29): runs benches/xds_scale.rs
# in a network namespace of its own whose OUTPUT chain redirects the services' ClusterIPs
# (10.96.0.0/12) to the capture port 15001, as istio-iptables does in a pod. The proxies
# (one worker each, one after the other) are pinned to core CORE (default 1); the bench
# process (ADS server, clients, backends) to the other core. Needs root; removes its
# namespace on exit. Usage: perf/xds-scale.sh [--quick]  (SERVICES, PROXIES,
# ENVOY_MAX_SERVICES, CONN_SECONDS, CONCURRENCY, EDS_PUSHES, PUSH_SECONDS, HELD, HOLD_PER_PUSH, API
# (sotw or delta), METRICS_PORT, RINGSIDE_BIN: the
# bench's header; BENCH: a bench executable built before)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
for arg in "$@"; do
  case "$arg" in
    --quick) export SERVICES=${SERVICES:-100,1000} CONN_SECONDS=${CONN_SECONDS:-1} PUSH_SECONDS=${PUSH_SECONDS:-3} ;;
    *) echo "usage: $0 [--quick]" >&2; exit 64 ;;
  esac
done
[[ $(id -u) == 0 ]] || { echo "perf/xds-scale.sh: needs root (a network namespace, iptables)" >&2; exit 1; }
for cmd in ip iptables taskset; do
  command -v "$cmd" >/dev/null || { echo "perf/xds-scale.sh: needs $cmd (tests/deps.sh installs it)" >&2; exit 1; }
done
export CORE=${CORE:-1}
LOAD_CORE=$(( CORE == 0 ? 1 : 0 ))
NS=rs-xds-scale-$$
cleanup() { ip netns del "$NS" 2>/dev/null || true; }
trap cleanup EXIT
trap 'exit 130' INT TERM

ENVOY=$(bash "$HERE/fetch-envoy.sh") || { echo "perf/xds-scale.sh: no Envoy; ringside only" >&2; ENVOY=; }
export ENVOY
# BENCH: a bench executable built before (e.g. from an exported commit), else built here.
BENCH=${BENCH:-}
[[ -n $BENCH ]] || BENCH=$(cd "$ROOT" && cargo bench --bench xds_scale --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "xds_scale" and m.get("executable"):
        print(m["executable"])' | tail -1)
[[ -x $BENCH ]] || { echo "perf/xds-scale.sh: the bench did not build" >&2; exit 1; }
# The bench runs target/release/ringside (CARGO_BIN_EXE_ringside), which `cargo bench` built
# beside it; RINGSIDE_BIN names another build.

ip netns add "$NS"
ip -n "$NS" link set lo up
# A pod's interface (a veth pair inside the namespace; no dummy module needed): the
# ClusterIPs need a route before the OUTPUT chain redirects them.
ip link add "xsa$$" netns "$NS" type veth peer name "xsb$$" netns "$NS"
ip -n "$NS" addr add 10.244.0.9/32 dev "xsa$$"
ip -n "$NS" link set "xsa$$" up
ip -n "$NS" link set "xsb$$" up
ip -n "$NS" route add 10.96.0.0/12 dev "xsa$$"
ip netns exec "$NS" iptables -t nat -A OUTPUT -p tcp -d 10.96.0.0/12 -j REDIRECT --to-ports 15001
# Each proxy's connection window leaves ~15,000 ports in TIME_WAIT, on both the client and
# the proxy's upstream side: without reuse the next proxy in the run finds the ephemeral
# range nearly used up and its connect()s (its CPU) slow to a crawl (~350/s).
ip netns exec "$NS" sysctl -qw net.ipv4.tcp_tw_reuse=1 net.ipv4.ip_local_port_range="1024 65000"
# The REDIRECT makes conntrack track every connection of the namespace (both legs), and a
# closed one stays in its table for 120 s: at ~10,000 connections/s the table (262,144
# entries) fills within a few proxies' windows, then SYNs are dropped and retried after a
# second, so whichever proxy ran later in the run looked slower (and a held connection could
# be reset). Closed connections leave the table after a second instead.
ip netns exec "$NS" sysctl -qw net.netfilter.nf_conntrack_tcp_timeout_time_wait=1
ulimit -n 20000
echo "perf/xds-scale: $(date -u +%FT%TZ) $(git -C "$ROOT" rev-parse --short HEAD), proxies on core $CORE, load on core $LOAD_CORE; machine shared" >&2
ip netns exec "$NS" taskset -c "$LOAD_CORE" "$BENCH" --bench
