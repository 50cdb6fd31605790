#!/usr/bin/env bash
# One command: ringside vs direct loopback, HAProxy, Envoy and nginx stream, all in one run.
# Writes perf/RESULTS.md, perf/results/raw.jsonl and the plots. Usage: perf/run.sh [--quick]
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
QUICK=0
RT=0
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=1 ;;
    --rt) RT=1 ;;
    *) echo "usage: $0 [--quick] [--rt]" >&2; exit 64 ;;
  esac
done

# Each measurement lasts seconds: other people build and test on this machine too.
if ((QUICK)); then
  BULK_SECONDS=1; STREAMS="1 4"; CONN_SECONDS=1; CONCURRENCY="1 16 64"; LAT_REQUESTS=10000
  QUIET_WAIT=6   # half-second samples before each measurement
  MANY_SECONDS=2; WORKER_CONNS=10000; WORKER_RUNS=3
else
  BULK_SECONDS=3; STREAMS="1 2 4 8"; CONN_SECONDS=2; CONCURRENCY="1 4 16 64"; LAT_REQUESTS=50000
  QUIET_WAIT=20
  MANY_SECONDS=5; WORKER_CONNS=30000; WORKER_RUNS=5
fi
# A subset run can lengthen its bulk runs (e.g. TLS rows with --quick): PERF_BULK_SECONDS=3.
BULK_SECONDS=${PERF_BULK_SECONDS:-$BULK_SECONDS}
MANY_STREAMS=200  # concurrent bulk streams through one unprivileged sidecar
MSG_SIZE=64
LOAD_CORE=0   # load generator and backend
PROXY_CORE=1  # every proxy process, so all targets compete for the same single core
BACKEND_PORT=18100; FRONT_PORT=18101; INNER_PORT=18102; METRICS_PORT=18103; METRICS_PORT2=18104
TARGETS="direct ringside-1 ringside-1-epoll ringside-1-metrics ringside-1-busy ringside-1-split ringside-2 ringside-2-off ringside-2-mtls haproxy haproxy-busy haproxy-2-tls envoy envoy-2-mtls nginx"
# The HBONE pairs (SPEC §12): two ringsides, two Envoys (perf/hbone-pair.sh).
TARGETS+=" ringside-2-hbone envoy-2-hbone"
# PERF_TARGETS="ringside-1 ringside-1-split" measures only those (a quick look at one feature;
# the rows that need the others then say "not evaluated").
TARGETS=${PERF_TARGETS:-$TARGETS}
# PERF_ROUNDS=3 measures every target that many times, in alternation (round 1 of each, then
# round 2 of each in reverse order, ...), so a neighbour's build hits them alike; the report
# takes each number's median.
ROUNDS=${PERF_ROUNDS:-1}
# PERF_NAME=mtls writes perf/results/mtls/ and perf/results/mtls/RESULTS.md instead of the
# full run's perf/results/ and perf/RESULTS.md (a subset run must not replace the full table).
NAME=${PERF_NAME:-}
BUSY_POLL=100us  # ringside-1-busy's window; HAProxy's busy-polling has none (it spins whenever it runs)
PYTHON=/usr/bin/python3  # Debian's, where python3-matplotlib installs
# Others compile on this machine: measured processes (every target alike) get a higher
# priority when allowed, so a neighbour's rustc perturbs the numbers less. nice does not stop
# a compiler on the proxy core from delaying wake-ups by a time slice; --rt (SCHED_FIFO) does,
# but starves everyone else on both cores while a test runs: only on a machine of your own.
PRIO=()
[[ $(nice -n -10 nice 2>/dev/null) == -10 ]] && PRIO=(nice -n -10)
((RT)) && PRIO=(chrt -f 10)

# A proxy holds two fds per relayed connection and this host's hard limit cannot be raised
# (no CAP_SYS_RESOURCE), so the idle test uses as many connections as the limit allows.
ulimit -n "$(ulimit -Hn)"
IDLE_CONNS=$(( ($(ulimit -n) - 400) / 2 ))  # 400 spare: listeners, logs, HAProxy's pipes
((IDLE_CONNS > 10000)) && IDLE_CONNS=10000

WORK=$(mktemp -d /tmp/ringside-perf.XXXXXX)
RAW=$WORK/raw.jsonl
PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { echo "perf: $*" >&2; }
die() { log "$*"; exit 1; }

install_missing() {
  local need=()
  command -v haproxy >/dev/null || need+=(haproxy)
  command -v nginx >/dev/null || need+=(nginx)
  [[ -e /usr/lib/nginx/modules/ngx_stream_module.so ]] || need+=(libnginx-mod-stream)
  "$PYTHON" -c 'import matplotlib' 2>/dev/null || need+=(python3-matplotlib)
  ((${#need[@]})) || return 0
  log "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y "${need[@]}" >/dev/null || { apt-get update >/dev/null && apt-get install -y "${need[@]}" >/dev/null; }
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Polls until the port accepts, for at most 5 s; fails early if the process died.
wait_port() {
  local port=$1 pid=$2 i
  for ((i = 0; i < 100; i++)); do
    port_open "$port" && return 0
    kill -0 "$pid" 2>/dev/null || return 1
    sleep 0.05
  done
  return 1
}

# Starts a command pinned to a core, in the background; its pid lands in LAST_PID.
spawn_on() {
  local core=$1; shift
  "${PRIO[@]}" taskset -c "$core" "$@" &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
}

# SIGTERM, then SIGKILL if it has not exited within 10 s (ringside drains for up to 5 s).
stop_pid() {
  local pid=$1 i
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < 100; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

loadgen() {
  timeout 120 "${PRIO[@]}" taskset -c "$LOAD_CORE" "$LOADGEN" "$@"
}

# Sum of utime+stime (clock ticks, all threads) over the proxy processes.
cpu_ticks() {
  local total=0 p rest f
  for p in "${PROXY_PIDS[@]}"; do
    rest=$(<"/proc/$p/stat"); rest=${rest##*) }
    read -r -a f <<<"$rest"
    total=$((total + f[11] + f[12]))
  done
  echo "$total"
}

rss_kb() {
  local total=0 p kb
  for p in "${PROXY_PIDS[@]}"; do
    kb=$(awk '/^VmRSS:/ {print $2}' "/proc/$p/status")
    total=$((total + kb))
  done
  echo "$total"
}

fd_count() {
  local total=0 p
  for p in "${PROXY_PIDS[@]}"; do total=$((total + $(ls "/proc/$p/fd" | wc -l))); done
  echo "$total"
}

# "busy total" clock ticks of the proxy core, from /proc/stat.
core_ticks() {
  awk -v cpu="cpu$PROXY_CORE" '$1 == cpu { print $2 + $3 + $4 + $7 + $8 + $9, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9 }' /proc/stat
}

# Appends one raw record: target, loadgen's JSON line, proxy CPU ticks and RSS around it, and
# how busy other processes kept the proxy core meanwhile (the noise in that measurement).
record() {
  local target=$1 result=$2 ticks=$3 rss_before=$4 rss_after=$5 others_pct=${6:-null}
  printf '{"target":"%s","round":%s,"cpu_ticks":%s,"rss_kb_before":%s,"rss_kb_after":%s,"others_pct":%s,"result":%s}\n' \
    "$target" "${ROUND:-1}" "$ticks" "$rss_before" "$rss_after" "$others_pct" "$result" >>"$RAW"
  echo "  $result" >&2
}

# Runs one loadgen client command and records it with the proxy CPU it cost.
measure() {
  local target=$1; shift
  local c0 c1 out busy0 total0 busy1 total1 others
  wait_quiet
  c0=$(cpu_ticks); read -r busy0 total0 < <(core_ticks)
  out=$(loadgen "$@" --target "127.0.0.1:$FRONT")
  c1=$(cpu_ticks); read -r busy1 total1 < <(core_ticks)
  others=$(( (busy1 - busy0 - (c1 - c0)) * 100 / (total1 - total0 > 0 ? total1 - total0 : 1) ))
  record "$target" "$out" $((c1 - c0)) 0 0 $((others < 0 ? 0 : others))
}

# Percent busy of each core over half a second, e.g. "12 80".
busy_pct() {
  local stat='/^cpu[0-9]/ {print $2 + $3 + $4 + $7 + $8 + $9, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9}'
  local before after
  before=$(awk "$stat" /proc/stat); sleep 0.5; after=$(awk "$stat" /proc/stat)
  paste -d' ' <(echo "$before") <(echo "$after") |
    awk '{printf "%d ", ($3 - $1) * 100 / ($4 - $2 + 1)} END {print ""}'
}

# Waits (bounded) until other processes leave both cores mostly idle, so neighbours' builds
# disturb the next measurement less; goes ahead anyway after that (others_pct tells).
wait_quiet() {
  local i busy
  for ((i = 0; i < QUIET_WAIT; i++)); do
    read -r -a busy < <(busy_pct)
    ((busy[0] <= 25 && busy[1] <= 25)) && return 0
  done
  return 0
}

# Opens IDLE_CONNS idle connections, reads the proxies' RSS once all are up, then closes them.
measure_idle() {
  local target=$1 out=$WORK/idle.out rss0 rss1 fds0 i pid line=""
  rss0=$(rss_kb); fds0=$(fd_count)
  : >"$out"
  "${PRIO[@]}" taskset -c "$LOAD_CORE" "$LOADGEN" idle --target "127.0.0.1:$FRONT" \
    --connections "$IDLE_CONNS" --hold-seconds 60 >"$out" &
  pid=$!; PIDS+=("$pid")
  for ((i = 0; i < 600; i++)); do
    line=$(grep -m1 '"ready":true' "$out" || true)
    [[ -n $line ]] && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  [[ -n $line ]] || die "$target: idle connections never became ready"
  rss1=$(rss_kb)
  stop_pid "$pid"
  record "$target" "$line" 0 "$rss0" "$rss1"
  # Let the proxy finish closing them, so the next test's CPU is its own.
  for ((i = 0; i < 100; i++)); do
    (($(fd_count) <= fds0 + 16)) && break
    sleep 0.1
  done
}

# RS_METRICS=0 runs ringside with RINGSIDE_ISTIO_METRICS=0: no istio_tcp_* counting at all,
# the baseline the "metrics on" row is compared with.
ringside_start() {  # listen upstream direction peer_exchange driver [extra flags...]
  local listen=$1 upstream=$2 direction=$3 exchange=$4 driver=$5; shift 5
  spawn_on "$PROXY_CORE" env RINGSIDE_ISTIO_METRICS="${RS_METRICS:-1}" "$RINGSIDE" run --listen "127.0.0.1:$listen" \
    --upstream "127.0.0.1:$upstream" --direction "$direction" --peer-exchange "$exchange" \
    --driver "$driver" --workers 1 --admin off --health off "$@" 2>>"$WORK/ringside.log"
  wait_port "$listen" "$LAST_PID" || return 1
  PROXY_PIDS+=("$LAST_PID")
}

# ringside-1 with a 3-way weighted route over subsets of one cluster (SPEC §6: tcp_routes, as
# a VirtualService splitting by version), the three endpoints all being the one backend: what
# routing adds per connection is then the only difference from ringside-1's single cluster.
ringside_split_start() {
  cat >"$WORK/split.yaml" <<EOF
workers: 1
driver: uring
metrics: {listen: "off"}
admin: {listen: "off"}
health: {listen: "off"}
listeners:
  - name: split
    listen: 127.0.0.1:$FRONT_PORT
    direction: outbound
    peer_exchange: "off"
    tcp_routes:
      - {cluster: echo, subset: v1, weight: 50}
      - {cluster: echo, subset: v2, weight: 30}
      - {cluster: echo, subset: v3, weight: 20}
clusters:
  - name: echo
    service: echo.default.svc.cluster.local
    endpoints:
      - {address: 127.0.0.1:$BACKEND_PORT, labels: {version: v1}}
      - {address: 127.0.0.1:$BACKEND_PORT, labels: {version: v2}}
      - {address: 127.0.0.1:$BACKEND_PORT, labels: {version: v3}}
    subsets:
      - {name: v1, labels: {version: v1}}
      - {name: v2, labels: {version: v2}}
      - {name: v3, labels: {version: v3}}
EOF
  spawn_on "$PROXY_CORE" env RINGSIDE_ISTIO_METRICS=0 "$RINGSIDE" run --config "$WORK/split.yaml" 2>>"$WORK/ringside.log"
  wait_port "$FRONT_PORT" "$LAST_PID" || return 1
  PROXY_PIDS+=("$LAST_PID")
}

haproxy_start() {  # [extra global line]
  cat >"$WORK/haproxy.cfg" <<EOF
global
  nbthread 1
  ${1:-}
  maxconn $((IDLE_CONNS + 50))
  # HAProxy reserves fds for maxpipes splice pipes (default maxconn/4) up front, which would
  # not fit the fd limit; a bulk test splices at most 8 streams at once.
  maxpipes 64
defaults
  mode tcp
  # What a user tuning HAProxy for L4 would enable: kernel splice when it pays off.
  option splice-auto
  timeout connect 5s
  timeout client 1h
  timeout server 1h
frontend front
  bind 127.0.0.1:$FRONT_PORT
  default_backend back
backend back
  server echo 127.0.0.1:$BACKEND_PORT
EOF
  spawn_on "$PROXY_CORE" haproxy -f "$WORK/haproxy.cfg" -db 2>>"$WORK/haproxy.log"
  wait_port "$FRONT_PORT" "$LAST_PID" || return 1
  PROXY_PIDS+=("$LAST_PID")
}

# Envoy as Istio runs it for TCP: a tcp_proxy filter to a static cluster whose circuit
# breakers are raised to 2^32-1 as istiod sets them (Envoy's own default stops at 1,024
# connections, which the idle test would hit), default buffers, one worker thread, no admin.
envoy_start() {
  [[ -n ${ENVOY:-} ]] || return 1
  cat >"$WORK/envoy.yaml" <<EOF
static_resources:
  listeners:
  - name: front
    address: {socket_address: {address: 127.0.0.1, port_value: $FRONT_PORT}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: front
          cluster: back
  clusters:
  - name: back
    type: STATIC
    connect_timeout: 5s
    circuit_breakers:
      thresholds:
      - max_connections: 4294967295
        max_pending_requests: 4294967295
        max_requests: 4294967295
        max_retries: 4294967295
    load_assignment:
      cluster_name: back
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: $BACKEND_PORT}}}
EOF
  spawn_on "$PROXY_CORE" "$ENVOY" -c "$WORK/envoy.yaml" --concurrency 1 --log-level error \
    --disable-hot-restart 2>>"$WORK/envoy.log"
  wait_port "$FRONT_PORT" "$LAST_PID" || return 1
  PROXY_PIDS+=("$LAST_PID")
}

nginx_start() {
  mkdir -p "$WORK/nginx"
  cat >"$WORK/nginx.conf" <<EOF
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
daemon off;
worker_processes 1;
worker_rlimit_nofile $(ulimit -n);
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections $(ulimit -n); }
stream {
  # proxy_half_close: forward a FIN instead of ending the session, as HAProxy and ringside do;
  # the bulk test's byte-count reply needs it.
  server { listen 127.0.0.1:$FRONT_PORT; proxy_pass 127.0.0.1:$BACKEND_PORT; proxy_half_close on; }
}
EOF
  spawn_on "$PROXY_CORE" nginx -p "$WORK/nginx" -c "$WORK/nginx.conf" -e "$WORK/nginx/error.log"
  wait_port "$FRONT_PORT" "$LAST_PID" || return 1
  # The master binds the port before it forks the worker; wait for the worker too.
  local i workers=""
  for ((i = 0; i < 50; i++)); do
    workers=$(pgrep -P "$LAST_PID" || true)
    [[ -n $workers ]] && break
    sleep 0.1
  done
  [[ -n $workers ]] || return 1
  # Master plus worker: both count for CPU and RSS.
  PROXY_PIDS+=("$LAST_PID" $workers)
}

# Istio-style workload identities for the mTLS rows (perf/certs.sh); HAProxy gets the same
# certificates.
make_certs() {
  local d=$WORK/certs id
  mesh_certs "$d" productpage ratings
  for id in productpage ratings; do cat "$d/$id-cert.pem" "$d/$id-key.pem" >"$d/$id-haproxy.pem"; done
}

# Two ringside sidecars with mTLS between them (exchange in mode alpn, strict inbound); with
# an argument, the inbound sidecar's `cipher_suites` (the server's choice decides the suite).
ringside_mtls_start() {
  mtls_pair_configs "$WORK/certs" "$BACKEND_PORT" "$INNER_PORT" "$FRONT_PORT" "$WORK/inner.yaml" \
    "$WORK/outer.yaml" "127.0.0.1:$METRICS_PORT2" "127.0.0.1:$METRICS_PORT" "${1:-}"
  local f port
  for f in inner:$INNER_PORT outer:$FRONT_PORT; do
    port=${f#*:}
    spawn_on "$PROXY_CORE" env RINGSIDE_TLS_CHAIN_CACHE="${RINGSIDE_TLS_CHAIN_CACHE:-1}" "$RINGSIDE" run \
      --config "$WORK/${f%%:*}.yaml" 2>>"$WORK/ringside.log"
    wait_port "$port" "$LAST_PID" || return 1
    PROXY_PIDS+=("$LAST_PID")
  done
}

# The same topology with two HAProxy processes: TLS 1.3 on the hop between them (OpenSSL),
# client certificates required and verified against the same root, the same ALPN.
haproxy_tls_start() {
  local d=$WORK/certs
  cat >"$WORK/haproxy-inner.cfg" <<EOF
global
  nbthread 1
  maxconn $((IDLE_CONNS + 50))
  maxpipes 64
defaults
  mode tcp
  timeout connect 5s
  timeout client 1h
  timeout server 1h
frontend inner
  bind 127.0.0.1:$INNER_PORT ssl crt $d/ratings-haproxy.pem ca-file $d/root-cert.pem verify required alpn istio-peer-exchange,istio ssl-min-ver TLSv1.3
  default_backend app
backend app
  server echo 127.0.0.1:$BACKEND_PORT
EOF
  cat >"$WORK/haproxy-outer.cfg" <<EOF
global
  nbthread 1
  maxconn $((IDLE_CONNS + 50))
  maxpipes 64
defaults
  mode tcp
  timeout connect 5s
  timeout client 1h
  timeout server 1h
frontend front
  bind 127.0.0.1:$FRONT_PORT
  default_backend inner
backend inner
  server inner 127.0.0.1:$INNER_PORT ssl crt $d/productpage-haproxy.pem ca-file $d/root-cert.pem verify required alpn istio-peer-exchange,istio ssl-min-ver TLSv1.3
EOF
  local f port
  for f in inner:$INNER_PORT outer:$FRONT_PORT; do
    port=${f#*:}
    spawn_on "$PROXY_CORE" haproxy -f "$WORK/haproxy-${f%%:*}.cfg" -db 2>>"$WORK/haproxy.log"
    wait_port "$port" "$LAST_PID" || return 1
    PROXY_PIDS+=("$LAST_PID")
  done
}

# The same topology with two Envoy processes, configured as two Istio sidecars configure the
# hop: the outbound one's cluster originates TLS with its client certificate (SNI, the
# server's SPIFFE URI SAN matched), the inbound one's listener terminates it and requires a
# client certificate from the same root; TLS 1.3, Istio's ALPN, BoringSSL's default suites and
# Envoy's default session resumption (one cached session per cluster).
envoy_mtls_start() {
  [[ -n ${ENVOY:-} ]] || return 1
  local d=$WORK/certs
  local breakers="circuit_breakers: {thresholds: [{max_connections: 4294967295, max_pending_requests: 4294967295, max_requests: 4294967295, max_retries: 4294967295}]}"
  local tls13="tls_params: {tls_minimum_protocol_version: TLSv1_3, tls_maximum_protocol_version: TLSv1_3}"
  local certs="tls_certificates: [{certificate_chain: {filename: $d/ID-cert.pem}, private_key: {filename: $d/ID-key.pem}}]"
  cat >"$WORK/envoy-inner.yaml" <<EOF
static_resources:
  listeners:
  - name: inbound
    address: {socket_address: {address: 127.0.0.1, port_value: $INNER_PORT}}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            $tls13
            alpn_protocols: [istio-peer-exchange, istio]
            ${certs//ID/ratings}
            validation_context: {trusted_ca: {filename: $d/root-cert.pem}}
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: inbound
          cluster: app
  clusters:
  - name: app
    type: STATIC
    connect_timeout: 5s
    $breakers
    load_assignment:
      cluster_name: app
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: $BACKEND_PORT}}}}]}]
EOF
  cat >"$WORK/envoy-outer.yaml" <<EOF
static_resources:
  listeners:
  - name: outbound
    address: {socket_address: {address: 127.0.0.1, port_value: $FRONT_PORT}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: outbound
          cluster: ratings
  clusters:
  - name: ratings
    type: STATIC
    connect_timeout: 5s
    $breakers
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: ratings.default.svc.cluster.local
        common_tls_context:
          $tls13
          alpn_protocols: [istio-peer-exchange, istio]
          ${certs//ID/productpage}
          validation_context:
            trusted_ca: {filename: $d/root-cert.pem}
            match_typed_subject_alt_names: [{san_type: URI, matcher: {exact: "spiffe://cluster.local/ns/default/sa/ratings"}}]
    load_assignment:
      cluster_name: ratings
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: $INNER_PORT}}}}]}]
EOF
  local f port
  for f in inner:$INNER_PORT outer:$FRONT_PORT; do
    port=${f#*:}
    spawn_on "$PROXY_CORE" "$ENVOY" -c "$WORK/envoy-${f%%:*}.yaml" --concurrency 1 --log-level error \
      --disable-hot-restart 2>>"$WORK/envoy.log"
    wait_port "$port" "$LAST_PID" || return 1
    PROXY_PIDS+=("$LAST_PID")
  done
}

# HBONE pairs (SPEC §12, issue #30) in perf/hbone-pair.sh's configurations, as perf/hbone.sh
# measures them: the originator listens on FRONT_PORT, the terminator's HBONE port is
# INNER_PORT, the mTLS rows' certificates (productpage → ratings); admin on the metrics ports.
source "$HERE/hbone-pair.sh"
source "$HERE/certs.sh"
hbone_start() {  # ringside|envoy
  local f port
  if [[ $1 == envoy ]]; then
    [[ -n ${ENVOY:-} ]] || return 1
    hbone_envoy_configs "$WORK" "$WORK/certs" productpage ratings "$FRONT_PORT" "$INNER_PORT" "$BACKEND_PORT" \
      "$METRICS_PORT" "$METRICS_PORT2"
  else
    hbone_ringside_configs "$WORK" "$WORK/certs" productpage ratings "$FRONT_PORT" "$INNER_PORT" "$BACKEND_PORT" \
      "$METRICS_PORT" "$METRICS_PORT2"
  fi
  for f in term:$INNER_PORT orig:$FRONT_PORT; do
    port=${f#*:}
    if [[ $1 == envoy ]]; then
      spawn_on "$PROXY_CORE" "$ENVOY" -c "$WORK/envoy-${f%%:*}.yaml" --concurrency 1 --log-level error \
        --disable-hot-restart 2>>"$WORK/envoy.log"
    else
      spawn_on "$PROXY_CORE" "$RINGSIDE" run --config "$WORK/${f%%:*}.yaml" 2>>"$WORK/ringside.log"
    fi
    wait_port "$port" "$LAST_PID" || return 1
    PROXY_PIDS+=("$LAST_PID")
  done
}

# Scrape a metrics port once a second on the load core, bounded to 10 minutes; stopped with
# the target (its PID is in PIDS for the final cleanup too).
scrape_loop() {
  local port=$1
  spawn_on "$LOAD_CORE" bash -c "for i in \$(seq 600); do curl -s -o /dev/null http://127.0.0.1:$port/stats/prometheus || exit 0; sleep 1; done"
  SCRAPER_PID=$LAST_PID
}

# Starts a target's proxies; sets FRONT (where clients connect) and PROXY_PIDS.
start_target() {
  PROXY_PIDS=()
  FRONT=$FRONT_PORT
  case $1 in
    direct) FRONT=$BACKEND_PORT ;;
    ringside-1) RS_METRICS=0 ringside_start "$FRONT_PORT" "$BACKEND_PORT" outbound off uring --metrics off ;;
    ringside-1-epoll) RS_METRICS=0 ringside_start "$FRONT_PORT" "$BACKEND_PORT" outbound off epoll --metrics off ;;
    # Opt-in latency mode, compared with HAProxy's own busy-polling as well as its default.
    ringside-1-busy)
      RS_METRICS=0 ringside_start "$FRONT_PORT" "$BACKEND_PORT" outbound off uring --metrics off --busy-poll "$BUSY_POLL" ;;
    ringside-1-split) ringside_split_start ;;
    # ringside-1 above counts no istio_tcp_* series at all (RINGSIDE_ISTIO_METRICS=0); this
    # one counts them and is scraped every second meanwhile, as Prometheus would (15 s is the
    # usual interval): the difference is the whole cost of metrics.
    ringside-1-metrics)
      ringside_start "$FRONT_PORT" "$BACKEND_PORT" outbound off uring --metrics "127.0.0.1:$METRICS_PORT" &&
        scrape_loop "$METRICS_PORT" ;;
    # Two sidecars as a mesh runs them (metrics on), with the exchange and without it.
    ringside-2)
      ringside_start "$INNER_PORT" "$BACKEND_PORT" inbound always uring --metrics "127.0.0.1:$METRICS_PORT2" &&
        ringside_start "$FRONT_PORT" "$INNER_PORT" outbound always uring --metrics "127.0.0.1:$METRICS_PORT" ;;
    ringside-2-off)
      ringside_start "$INNER_PORT" "$BACKEND_PORT" inbound off uring --metrics "127.0.0.1:$METRICS_PORT2" &&
        ringside_start "$FRONT_PORT" "$INNER_PORT" outbound off uring --metrics "127.0.0.1:$METRICS_PORT" ;;
    ringside-2-mtls) ringside_mtls_start ;;
    # Not in the default list (PERF_TARGETS): the same pair on one suite each, for the choice
    # of the default order (README, Decisions).
    ringside-2-mtls-aes128) ringside_mtls_start TLS_AES_128_GCM_SHA256 ;;
    ringside-2-mtls-aes256) ringside_mtls_start TLS_AES_256_GCM_SHA384 ;;
    ringside-2-mtls-chacha) ringside_mtls_start TLS_CHACHA20_POLY1305_SHA256 ;;
    # Without the cache of verified peer chains (README, Decisions).
    ringside-2-mtls-nocache) RINGSIDE_TLS_CHAIN_CACHE=0 ringside_mtls_start ;;
    # The same pair on other builds (RINGSIDE_BASE, RINGSIDE_BASE2: paths to ringside
    # binaries), for an A/B/C of changes within one run.
    ringside-2-mtls-base) RINGSIDE=${RINGSIDE_BASE:?RINGSIDE_BASE names a binary} ringside_mtls_start ;;
    ringside-2-mtls-base2) RINGSIDE=${RINGSIDE_BASE2:?RINGSIDE_BASE2 names a binary} ringside_mtls_start ;;
    haproxy-2-tls) haproxy_tls_start ;;
    haproxy) haproxy_start ;;
    haproxy-busy) haproxy_start busy-polling ;;
    envoy) envoy_start ;;
    envoy-2-mtls) envoy_mtls_start ;;
    ringside-2-hbone) hbone_start ringside ;;
    envoy-2-hbone) hbone_start envoy ;;
    nginx) nginx_start ;;
  esac
}

stop_target() {
  local p
  if [[ -n ${SCRAPER_PID:-} ]]; then kill "$SCRAPER_PID" 2>/dev/null || true; SCRAPER_PID=; fi
  for p in "${PROXY_PIDS[@]}"; do stop_pid "$p"; done
}

# Which cores each process's threads may run on, as the kernel reports it.
affinity() {
  local pid=$1 t
  for t in /proc/"$pid"/task/*; do awk '/^Cpus_allowed_list:/ {print $2}' "$t/status"; done | sort -u | paste -sd, -
}

run_target() {
  local target=$1 c s p
  log "== $target (round $ROUND of $ROUNDS, load average $(cut -d' ' -f1-3 /proc/loadavg))"
  echo "loadavg_${target}_r$ROUND=$(cut -d' ' -f1-3 /proc/loadavg)" >>"$WORK/meta.txt"
  if ! start_target "$target"; then
    log "$target: did not start (see below); skipped"
    tail -n 3 "$WORK"/*.log 2>/dev/null >&2 || true
    stop_target
    echo "skipped_$target=did not start or never accepted on its port" >>"$WORK/meta.txt"
    return 0
  fi
  ((ROUND > 1)) || for p in "${PROXY_PIDS[@]}"; do
    echo "split_$target=pid $p ($(tr -d '\0' <"/proc/$p/comm")): cores $(affinity "$p")" >>"$WORK/meta.txt"
  done
  measure "$target" latency --connections 1 --requests "$LAT_REQUESTS" --size "$MSG_SIZE"
  measure_idle "$target"
  for c in $CONCURRENCY; do
    measure "$target" connrate --concurrency "$c" --seconds "$CONN_SECONDS" --size "$MSG_SIZE"
  done
  # The other common short-connection shape (an HTTP/1.0-style server): 32 in flight, the
  # backend closes first, so the proxy's upstream socket closes passively (no TIME_WAIT there).
  measure "$target" connrate --concurrency 32 --seconds "$CONN_SECONDS" --size "$MSG_SIZE" --closer backend
  # 1-stream is the headline ratio and swings ±10 % run to run here: three runs, the median.
  for s in $STREAMS; do
    for ((r = 0; r < (s == 1 ? 3 : 1); r++)); do
      measure "$target" bulk --streams "$s" --seconds "$BULK_SECONDS"
    done
  done
  stop_target
}

# Splice under a sidecar's limits: many bulk streams through ringside running as Istio's
# sidecar uid (1337, no CAP_SYS_RESOURCE), whose pipes share that uid's page budget
# (/proc/sys/fs/pipe-user-pages-soft); fds sampled during the run and once it is over.
many_streams() {  # target [env assignments...]
  local target=$1; shift
  local out=$WORK/many.out pid c0 c1 fds0 fds peak=0 i
  PROXY_PIDS=(); FRONT=$FRONT_PORT
  spawn_on "$PROXY_CORE" env RINGSIDE_ISTIO_METRICS=0 "$@" setpriv --reuid 1337 --regid 1337 --clear-groups \
    "$RINGSIDE" run --listen "127.0.0.1:$FRONT_PORT" --upstream "127.0.0.1:$BACKEND_PORT" \
    --direction outbound --peer-exchange off --driver uring --workers 1 --admin off --health off \
    --metrics off 2>>"$WORK/ringside.log"
  wait_port "$FRONT_PORT" "$LAST_PID" || { log "$target: did not start"; stop_target; return 0; }
  PROXY_PIDS+=("$LAST_PID")
  log "== $target ($MANY_STREAMS bulk streams, uid 1337)"
  wait_quiet
  fds0=$(fd_count); c0=$(cpu_ticks)
  loadgen bulk --target "127.0.0.1:$FRONT" --streams "$MANY_STREAMS" --seconds "$MANY_SECONDS" >"$out" &
  pid=$!
  for ((i = 0; i < 1200; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    fds=$(fd_count); ((fds > peak)) && peak=$fds
    sleep 0.1
  done
  wait "$pid" || true
  c1=$(cpu_ticks)
  # The streams closed: what the proxy still holds (pooled pipes) once it has closed them.
  for ((i = 0; i < 100; i++)); do (($(fd_count) <= fds0 + 16)) && break; sleep 0.1; done
  printf '{"target":"%s","cpu_ticks":%s,"fds_before":%s,"fds_peak":%s,"fds_after":%s,"result":%s}\n' \
    "$target" $((c1 - c0)) "$fds0" "$peak" "$(fd_count)" "$(<"$out")" >>"$WORK/many.jsonl"
  echo "  $(<"$out") fds $fds0 -> peak $peak" >&2
  stop_target
}

# Run time of all the proxy's threads in ns (schedstat): finer than clock ticks.
cpu_ns() {
  local total=0 t ns
  for t in /proc/"${PROXY_PIDS[0]}"/task/*; do read -r ns _ <"$t/schedstat"; total=$((total + ns)); done
  echo "$total"
}

# Shared-nothing: proxy CPU per connection with 2 workers against 1, on the same offered work
# (a fixed count of short connections at C=64), alternating runs. 1 worker runs on the proxy
# core; 2 workers are pinned one per core (pin auto), so one of them shares core 0 with the
# backend and the unpinned load generator: two cores leave the load no core of its own. Only
# the proxy's own CPU time is counted, over the connections it served. (2 workers on one core
# would add a context switch between the two event loops per wake-up: not what is measured.)
workers_cost() {
  local run cfg w cores out c0 c1
  for ((run = 0; run < WORKER_RUNS; run++)); do
    for cfg in "1 $PROXY_CORE" "2 0,1"; do
      read -r w cores <<<"$cfg"
      PROXY_PIDS=(); FRONT=$FRONT_PORT
      spawn_on "$cores" env RINGSIDE_ISTIO_METRICS=0 "$RINGSIDE" run --listen "127.0.0.1:$FRONT_PORT" \
        --upstream "127.0.0.1:$BACKEND_PORT" --direction outbound --peer-exchange off --driver uring \
        --workers "$w" --admin off --health off --metrics off 2>>"$WORK/ringside.log"
      wait_port "$FRONT_PORT" "$LAST_PID" || { log "workers $w: did not start"; stop_target; return 0; }
      PROXY_PIDS+=("$LAST_PID")
      wait_quiet
      c0=$(cpu_ns)
      out=$(timeout 120 "${PRIO[@]}" "$LOADGEN" connrate --target "127.0.0.1:$FRONT" --concurrency 64 \
        --seconds 60 --max "$WORKER_CONNS" --size "$MSG_SIZE")
      c1=$(cpu_ns)
      printf '{"workers":%s,"cores":"%s","cpu_ns":%s,"result":%s}\n' "$w" "$cores" $((c1 - c0)) "$out" \
        >>"$WORK/workers.jsonl"
      echo "  workers $w on cores $cores: $out cpu $(((c1 - c0) / 1000000)) ms" >&2
      stop_target
    done
  done
}

install_missing
ENVOY=$("$HERE/fetch-envoy.sh") || { log "could not fetch Envoy: envoy rows skipped"; ENVOY=; }
make_certs
log "building ringside (release) and the load generator"
(cd "$ROOT" && cargo build --release --quiet)
cargo build --release --quiet --manifest-path "$HERE/loadgen/Cargo.toml"
LOADGEN=$HERE/loadgen/target/release/loadgen
RINGSIDE=$ROOT/target/release/ringside

for port in $BACKEND_PORT $FRONT_PORT $INNER_PORT $METRICS_PORT; do
  port_open "$port" && die "port $port is already in use on 127.0.0.1"
done

RINGSIDE_VERSION=$("$RINGSIDE" --version 2>/dev/null | head -n1 || true)
if [[ -z $RINGSIDE_VERSION ]]; then
  log "ringside has no working CLI yet (\`ringside --version\` printed nothing): ringside rows skipped"
  TARGETS=$(tr ' ' '\n' <<<"$TARGETS" | grep -v '^ringside' | paste -sd' ' -)
  RINGSIDE_VERSION="not built: \`ringside run\` missing"
fi

{
  echo "mode=$( ((QUICK)) && echo quick || echo full)"
  echo "date=$(date -u +%Y-%m-%dT%H:%MZ)"
  echo "commit=$(git -C "$ROOT" rev-parse --short HEAD)"
  echo "nproc=$(nproc)"
  echo "clk_tck=$(getconf CLK_TCK)"
  echo "kernel=$(uname -r)"
  echo "cpu=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
  # The instructions AES-GCM and X25519 code picks its path by (tls::aead, the bulk ratios).
  echo "cpu_features=$(awk '/^flags/ {print; exit}' /proc/cpuinfo | tr ' ' '\n' |
    grep -xE 'aes|pclmulqdq|avx2|vaes|vpclmulqdq|avx512f|avx512dq|avx512bw|avx512vl|sha_ni|adx|bmi2' | paste -sd' ')"
  echo "haproxy=$(haproxy -v | head -n1)"
  echo "nginx=$(nginx -v 2>&1)"
  echo "envoy=$([[ -n $ENVOY ]] && "$ENVOY" --version | grep -o 'version: [^ ]*' || echo 'not fetched')"
  echo "ringside=$RINGSIDE_VERSION"
  echo "loadgen=perf/loadgen (monoio $(awk -F'"' '/^name = "monoio"/ {getline; print $2}' "$HERE/loadgen/Cargo.lock")), single thread"
  echo "priority=${PRIO[*]:-default}"
  echo "idle_conns=$IDLE_CONNS"
  echo "fd_limit=$(ulimit -n)"
  echo "bulk_seconds=$BULK_SECONDS"
  echo "conn_seconds=$CONN_SECONDS"
  echo "lat_requests=$LAT_REQUESTS"
  echo "msg_size=$MSG_SIZE"
  echo "busy_poll=$BUSY_POLL"
  echo "load_core=$LOAD_CORE"
  echo "proxy_core=$PROXY_CORE"
  echo "many_streams=$MANY_STREAMS"
  echo "many_seconds=$MANY_SECONDS"
  echo "worker_conns=$WORKER_CONNS"
  echo "worker_runs=$WORKER_RUNS"
  echo "pipe_user_pages_soft=$(cat /proc/sys/fs/pipe-user-pages-soft 2>/dev/null || echo n/a)"
} >"$WORK/meta.txt"

spawn_on "$LOAD_CORE" "$LOADGEN" echo-server --listen "127.0.0.1:$BACKEND_PORT" --seconds $((1800 * ROUNDS)) >/dev/null
BACKEND_PID=$LAST_PID
wait_port "$BACKEND_PORT" "$BACKEND_PID" || die "backend did not start"
echo "split_backend=pid $BACKEND_PID (loadgen echo-server): cores $(affinity "$BACKEND_PID")" >>"$WORK/meta.txt"
echo "split_loadgen=taskset -c $LOAD_CORE" >>"$WORK/meta.txt"
log "core split: load generator + backend on core $LOAD_CORE, proxies on core $PROXY_CORE"

# Warm-up, not reported: the load core and the backend move bulk and connections directly first.
# Without it the first target measured ran 5-12 % slower (CPU per GB) than its later rounds.
taskset -c "$LOAD_CORE" "$LOADGEN" bulk --target "127.0.0.1:$BACKEND_PORT" --streams 1 --seconds 3 >/dev/null
taskset -c "$LOAD_CORE" "$LOADGEN" connrate --target "127.0.0.1:$BACKEND_PORT" --concurrency 64 --seconds 1 \
  --size 64 >/dev/null

echo "rounds=$ROUNDS" >>"$WORK/meta.txt"
# Every other round takes the targets in reverse order, so none is always first or last.
for ((ROUND = 1; ROUND <= ROUNDS; ROUND++)); do
  order=$TARGETS
  ((ROUND % 2 == 0)) && order=$(tr ' ' '\n' <<<"$TARGETS" | tac | tr '\n' ' ')
  for target in $order; do run_target "$target"; done
done
: >"$WORK/many.jsonl"; : >"$WORK/workers.jsonl"
# With PERF_TARGETS (a subset), the two ringside-only phases run only when PERF_PHASES=1.
if [[ ${PERF_PHASES:-$([[ -z ${PERF_TARGETS:-} ]] && echo 1)} == 1 && -n $RINGSIDE_VERSION ]]; then
  if command -v setpriv >/dev/null && [[ $(id -u) == 0 ]]; then
    many_streams ringside-uid1337-splice
    many_streams ringside-uid1337-copy RINGSIDE_SPLICE=0
  else
    echo "skipped_many_streams=needs root and setpriv to run ringside as uid 1337" >>"$WORK/meta.txt"
  fi
  workers_cost
fi
stop_pid "$BACKEND_PID"

OUT=$HERE/results${NAME:+/$NAME}
REPORT=$HERE/RESULTS.md
[[ -n $NAME ]] && REPORT=$OUT/RESULTS.md
mkdir -p "$OUT"
cp "$RAW" "$OUT/raw.jsonl"
cp "$WORK/many.jsonl" "$OUT/many.jsonl"
cp "$WORK/workers.jsonl" "$OUT/workers.jsonl"
cp "$WORK/meta.txt" "$OUT/meta.txt"
"$PYTHON" "$HERE/plot.py" "$OUT"
# perf/RESULTS.md: the report replaces what is above the marker line; the measurements written
# by hand below it (issue by issue) are kept. A named run writes a report of its own.
MARKER='<!-- perf/run.sh regenerates what is above this line and keeps what is below it: measurements written by hand, issue by issue. -->'
kept=$WORK/results-kept.md
: >"$kept"
if [[ -z $NAME && -f $REPORT ]]; then
  at=$(grep -n -x -F -- "$MARKER" "$REPORT" | head -1 | cut -d: -f1)
  if [[ -n $at ]]; then { echo; tail -n +"$at" "$REPORT"; } >"$kept"; fi
fi
"$PYTHON" "$HERE/report.py" "$OUT" >"$WORK/report.md"
cat "$WORK/report.md" "$kept" >"$REPORT"
log "wrote $REPORT"
