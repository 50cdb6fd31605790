#!/usr/bin/env bash
# HBONE pair (SPEC §12, issue #30): two ringsides (an originator: outbound listener, cluster
# with `tunnel: hbone`; a terminator: listener with `tunnel: hbone`) against two Envoys
# (tcp_proxy `tunneling_config` over HTTP/2 mTLS; http_connection_manager CONNECT upgrade),
# on the same core split as perf/run.sh: both proxies of a pair on one core, loadgen and the
# echo backend on the other. Per pair: 1-stream throughput (median of 3) and proxy CPU per
# GB, connections/s at C=64 (64 B each way, then close), request/response latency over one
# connection (64 B), RSS per idle tunnelled connection.
# Prints one JSON line per pair and round and a Markdown table of medians.
#   HBONE_ROUNDS=N perf/hbone.sh [--quick]
# Every pair is measured in each of N rounds (default 2), the order reversed in every other
# round, after a warm-up of the load core and backend: the first pair measured after the
# backend starts ran 8-12 % slower (CPU per GB) than the same build measured next, and the
# Envoy pair, always last, never paid that.
source "$(dirname "$0")/harness.sh"
source "$(dirname "$0")/hbone-pair.sh"
source "$(dirname "$0")/certs.sh"

BULK_SECONDS=3; CONN_SECONDS=3; IDLE=2000
[[ ${1:-} == --quick ]] && { BULK_SECONDS=1; CONN_SECONDS=1; IDLE=500; }
LOAD_CORE=0; PROXY_CORE=1
BACKEND=18400; FRONT=18401; TUNNEL=18402; ADMIN1=18403; ADMIN2=18404
ENVOY=$("$HERE/fetch-envoy.sh") || die "no Envoy binary"

build
spawn taskset -c "$LOAD_CORE" "$LOADGEN" echo-server --listen "127.0.0.1:$BACKEND" --seconds 3600 >/dev/null
for ((i = 0; i < 100; i++)); do (exec 3<>"/dev/tcp/127.0.0.1/$BACKEND") 2>/dev/null && break; sleep 0.05; done

# Certificates: a mesh root, a client and a server SPIFFE identity.
d=$WORK/certs
mesh_certs "$d" client server

wait_port() {
  for ((i = 0; i < 200; i++)); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done
  die "nothing listens on $1"
}

ringside_pair() {
  hbone_ringside_configs "$WORK" "$d" client server "$FRONT" "$TUNNEL" "$BACKEND" "$ADMIN1" "$ADMIN2"
  RUST_LOG=warn spawn taskset -c "$PROXY_CORE" "$RINGSIDE" run --config "$WORK/term.yaml" 2>>"$WORK/ringside.log"
  P1=$LAST_PID; wait_port "$TUNNEL"
  RUST_LOG=warn spawn taskset -c "$PROXY_CORE" "$RINGSIDE" run --config "$WORK/orig.yaml" 2>>"$WORK/ringside.log"
  P2=$LAST_PID; wait_port "$FRONT"
}

envoy_pair() {
  hbone_envoy_configs "$WORK" "$d" client server "$FRONT" "$TUNNEL" "$BACKEND" "$ADMIN1" "$ADMIN2"
  spawn taskset -c "$PROXY_CORE" "$ENVOY" -c "$WORK/envoy-term.yaml" --concurrency 1 --log-level error \
    --disable-hot-restart 2>>"$WORK/envoy.log"
  P1=$LAST_PID; wait_port "$TUNNEL"
  spawn taskset -c "$PROXY_CORE" "$ENVOY" -c "$WORK/envoy-orig.yaml" --concurrency 1 --log-level error \
    --disable-hot-restart 2>>"$WORK/envoy.log"
  P2=$LAST_PID; wait_port "$FRONT"
}

stop_pair() {
  kill -TERM "$P1" "$P2" 2>/dev/null || true
  wait "$P1" "$P2" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do (exec 3<>"/dev/tcp/127.0.0.1/$FRONT") 2>/dev/null || break; sleep 0.05; done
}

pair_ticks() { echo $(($(cpu_ticks "$P1") + $(cpu_ticks "$P2"))); }
pair_rss() { echo $(($(rss_kib "$P1") + $(rss_kib "$P2"))); }
lg() { taskset -c "$LOAD_CORE" "$LOADGEN" "$@"; }

measure_pair() {
  local name=$1 runs=() t0 t1 bytes=0 out gbit conns idle_out rss0 rss1 held
  # Warm up: the first connections open the tunnels.
  lg connrate --target "127.0.0.1:$FRONT" --concurrency 4 --seconds 1 --size 64 >/dev/null
  t0=$(pair_ticks)
  for r in 1 2 3; do
    out=$(lg bulk --target "127.0.0.1:$FRONT" --streams 1 --seconds "$BULK_SECONDS") ||
      { tail -n 5 "$WORK"/*.log >&2; die "$name: bulk failed: $out"; }
    [[ -n $out ]] || { tail -n 5 "$WORK"/*.log >&2; ps -o pid,args -p "$P1,$P2" >&2; die "$name: bulk printed nothing"; }
    runs+=("$(json_field gbit_per_s <<<"$out")")
    bytes=$((bytes + $(json_field bytes <<<"$out")))
  done
  t1=$(pair_ticks)
  gbit=$(printf '%s\n' "${runs[@]}" | sort -g | sed -n 2p)
  local cpu_per_gb
  cpu_per_gb=$(python3 -c "print(f'{($t1 - $t0) / 100 / max($bytes / 1e9, 1e-9):.3f}')")
  out=$(lg connrate --target "127.0.0.1:$FRONT" --concurrency 64 --seconds "$CONN_SECONDS" --size 64)
  conns=$(json_field conn_per_s <<<"$out")
  local cerr p50 p99
  cerr=$(json_field errors <<<"$out")
  # Request/response latency over one tunnelled connection (64 B each way).
  out=$(lg latency --target "127.0.0.1:$FRONT" --connections 1 --requests 20000 --size 64)
  p50=$(json_field p50_us <<<"$out"); p99=$(json_field p99_us <<<"$out")
  rss0=$(pair_rss)
  # taskset execs loadgen: $! is loadgen itself, so the kill below closes its connections.
  taskset -c "$LOAD_CORE" "$LOADGEN" idle --target "127.0.0.1:$FRONT" --connections "$IDLE" \
    --hold-seconds 30 >"$WORK/idle-$name-${ROUND:-1}.json" &
  local idle_pid=$!
  for ((i = 0; i < 600; i++)); do [[ -s $WORK/idle-$name-${ROUND:-1}.json ]] && break; sleep 0.1; done
  rss1=$(pair_rss)
  held=$(json_field connections <"$WORK/idle-$name-${ROUND:-1}.json")
  kill "$idle_pid" 2>/dev/null || true; wait "$idle_pid" 2>/dev/null || true
  local per_conn
  per_conn=$(python3 -c "print(f'{($rss1 - $rss0) / max($held, 1):.2f}')")
  printf '{"pair":"%s","round":%s,"gbit_1_stream":%s,"bulk_runs":"%s","cpu_s_per_gb":%s,"conn_per_s_c64":%s,"conn_errors":%s,"p50_us":%s,"p99_us":%s,"idle_held":%s,"rss_kib_per_idle_conn":%s}\n' \
    "$name" "${ROUND:-1}" "$gbit" "${runs[*]}" "$cpu_per_gb" "$conns" "$cerr" "$p50" "$p99" "$held" "$per_conn" | tee -a "$WORK/hbone.jsonl"
}

if [[ -n ${HBONE_PROFILE:-} ]]; then
  # A look at where the ringside pair's CPU goes under one bulk stream (perf record).
  ringside_pair
  taskset -c "$LOAD_CORE" "$LOADGEN" bulk --target "127.0.0.1:$FRONT" --streams 1 --seconds 6 >/dev/null &
  bulk_pid=$!
  perf record -F 499 --call-graph dwarf,16384 -o "$WORK/perf.data" -p "$P1,$P2" -- sleep 4 2>/dev/null
  wait "$bulk_pid"
  # Flat first (self time by symbol), then the callers of the biggest ones.
  perf report -i "$WORK/perf.data" --stdio --no-children -g none --percent-limit 0.7 2>/dev/null |
    grep -v -e '^$' -e '^#' | head -40
  perf report -i "$WORK/perf.data" --stdio --no-children --percent-limit 4 2>/dev/null | grep -v '^$' | head -150
  stop_pair
  exit 0
fi
# HBONE_SYSCALLS=1: syscalls and context switches per MiB of one bulk stream, each proxy of each
# pair on its own (originator: the plaintext → tunnel side; terminator: tunnel → backend), by
# perf's syscall tracepoints over a BULK_SECONDS transfer. Prints one JSON line per proxy.
SYSCALLS="recvfrom sendto sendmsg recvmsg writev readv write read io_uring_enter epoll_wait"
count_syscalls() {
  local name=$1 role pid out bytes ev
  local events=raw_syscalls:sys_enter,context-switches
  for ev in $SYSCALLS; do events+=",syscalls:sys_enter_$ev"; done
  lg connrate --target "127.0.0.1:$FRONT" --concurrency 4 --seconds 1 --size 64 >/dev/null
  perf stat -x, -e "$events" -p "$P2" -o "$WORK/stat-orig" &
  local s1=$!
  perf stat -x, -e "$events" -p "$P1" -o "$WORK/stat-term" &
  local s2=$!
  sleep 0.5 # perf attached (it prints nothing to wait on)
  out=$(lg bulk --target "127.0.0.1:$FRONT" --streams 1 --seconds "$BULK_SECONDS")
  kill -INT "$s1" "$s2"; wait "$s1" "$s2" 2>/dev/null || true
  bytes=$(json_field bytes <<<"$out")
  for role in orig term; do
    python3 - "$WORK/stat-$role" "$bytes" "$name" "$role" <<'EOF' | tee -a "$WORK/syscalls.jsonl"
import json, sys
path, nbytes, name, role = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
mib = nbytes / (1 << 20)
row = {"pair": name, "proxy": role, "mib": round(mib)}
for line in open(path):
    f = line.strip().split(",")
    if len(f) < 3 or not f[0].replace(".", "").isdigit():
        continue
    ev = f[2].replace("syscalls:sys_enter_", "").replace("raw_syscalls:sys_enter", "all_syscalls")
    row[ev] = round(float(f[0]) / mib, 2)
print(json.dumps(row))
EOF
  done
}
if [[ -n ${HBONE_SYSCALLS:-} ]]; then
  for rs in ${HBONE_RINGSIDES:-hbone=$RINGSIDE}; do
    RINGSIDE=${rs#*=}
    ringside_pair
    count_syscalls "ringside-${rs%%=*}"
    stop_pair
  done
  envoy_pair
  count_syscalls envoy-hbone
  stop_pair
  exit 0
fi
# HBONE_RINGSIDES="before=/tmp/rs-old after=target/release/ringside" measures several builds in
# turn, each as its own row (a change's before and after in one session).
PAIRS=()
if [[ -z ${HBONE_ENVOY_ONLY:-} ]]; then PAIRS=(${HBONE_RINGSIDES:-hbone=$RINGSIDE}); fi
PAIRS+=(envoy)
measure_named() {
  if [[ $1 == envoy ]]; then
    log "envoy pair ($("$ENVOY" --version | grep -o 'version: [^ ]*'), round $2)"
    envoy_pair
    ROUND=$2 measure_pair envoy-hbone
  else
    RINGSIDE=${1#*=}
    log "ringside pair (${1%%=*}: $RINGSIDE, round $2)"
    ringside_pair
    ROUND=$2 measure_pair "ringside-${1%%=*}"
  fi
  stop_pair
}
# Warm-up, not reported: the load core and the backend move bulk and connections directly.
lg bulk --target "127.0.0.1:$BACKEND" --streams 1 --seconds "$BULK_SECONDS" >/dev/null
lg connrate --target "127.0.0.1:$BACKEND" --concurrency 64 --seconds 1 --size 64 >/dev/null
for ((round = 1; round <= ${HBONE_ROUNDS:-2}; round++)); do
  order=("${PAIRS[@]}")
  if ((round % 2 == 0)); then
    order=(); for ((i = ${#PAIRS[@]} - 1; i >= 0; i--)); do order+=("${PAIRS[i]}"); done
  fi
  for pair in "${order[@]}"; do measure_named "$pair" "$round"; done
done

python3 - "$WORK/hbone.jsonl" <<'EOF'
import json, statistics, sys
runs = {}
for r in map(json.loads, open(sys.argv[1])):
    runs.setdefault(r["pair"], []).append(r)
keys = ["gbit_1_stream", "cpu_s_per_gb", "conn_per_s_c64", "p50_us", "p99_us", "rss_kib_per_idle_conn"]
med = {name: {k: statistics.median(r[k] for r in rs) for k in keys} for name, rs in runs.items()}
e = med["envoy-hbone"]
print(f"Medians of {len(runs['envoy-hbone'])} round(s); CPU per GB / Envoy's round by round in the last column.")
print()
print("| pair | 1-stream Gbit/s | CPU s/GB | conn/s C=64 | p50 µs | p99 µs | RSS KiB/idle conn | CPU per GB / Envoy's, rounds |")
print("|---|---:|---:|---:|---:|---:|---:|---|")
for name, t in med.items():
    by_round = ", ".join(f"{r['cpu_s_per_gb'] / envoy['cpu_s_per_gb']:.2f}"
                         for r, envoy in zip(runs[name], runs["envoy-hbone"]))
    print(f"| {name} | {t['gbit_1_stream']:.2f} | {t['cpu_s_per_gb']:.3f} | {t['conn_per_s_c64']:.0f} | "
          f"{t['p50_us']:.1f} | {t['p99_us']:.1f} | {t['rss_kib_per_idle_conn']:.2f} | {by_round} |")
for name, r in med.items():
    if name == "envoy-hbone":
        continue
    ratio = lambda k: r[k] / e[k] if e[k] else float("nan")
    print(f"| {name} / envoy | {ratio('gbit_1_stream'):.2f} | {ratio('cpu_s_per_gb'):.2f} | "
          f"{ratio('conn_per_s_c64'):.2f} | {ratio('p50_us'):.2f} | {ratio('p99_us'):.2f} | "
          f"{ratio('rss_kib_per_idle_conn'):.2f} | |")
EOF
