#!/usr/bin/env bash
# Two ringside sidecars with mutual TLS between them (perf/run.sh's ringside-2-mtls pair:
# outbound sidecar → TLS 1.3 with client certificates → inbound sidecar → sink), one bulk
# stream at a time, several builds alternated in one session (issue #31's bulk path):
# CPU per GB of both proxies over 3 runs, 1-stream throughput (median), and with
# MTLS_SYSCALLS=1 the syscalls, ring enters and context switches per MiB of each proxy;
# MTLS_STREAMS=N: N streams at once instead of one (CPU per GB only).
#   MTLS_RINGSIDES="base=/work/base/ringside-429b381 new=target/release/ringside" \
#     flock /tmp/perf.lock perf/mtls-bulk.sh [ROUNDS]
# Both proxies on core 1, loadgen and its sink on core 0, as perf/run.sh; ports 18500-18503.
source "$(dirname "$0")/harness.sh"
source "$(dirname "$0")/certs.sh"

ROUNDS=${1:-2}; BULK_SECONDS=${MTLS_BULK_SECONDS:-3}
LOAD_CORE=0; PROXY_CORE=1
BACKEND=18500; FRONT=18501; INNER=18502

build
spawn taskset -c "$LOAD_CORE" "$LOADGEN" echo-server --listen "127.0.0.1:$BACKEND" --seconds 3600 >/dev/null

# Certificates: a mesh root and two SPIFFE identities (as perf/run.sh makes them).
d=$WORK/certs
mesh_certs "$d" productpage ratings
mtls_pair_configs "$d" "$BACKEND" "$INNER" "$FRONT" "$WORK/inner.yaml" "$WORK/outer.yaml"

wait_port() {
  for ((i = 0; i < 200; i++)); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done
  die "nothing listens on $1"
}
start_pair() {
  RUST_LOG=warn spawn taskset -c "$PROXY_CORE" "$1" run --config "$WORK/inner.yaml" 2>>"$WORK/ringside.log"
  P1=$LAST_PID; wait_port "$INNER"
  RUST_LOG=warn spawn taskset -c "$PROXY_CORE" "$1" run --config "$WORK/outer.yaml" 2>>"$WORK/ringside.log"
  P2=$LAST_PID; wait_port "$FRONT"
}
stop_pair() {
  kill -TERM "$P1" "$P2" 2>/dev/null || true
  wait "$P1" "$P2" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do (exec 3<>"/dev/tcp/127.0.0.1/$FRONT") 2>/dev/null || break; sleep 0.05; done
}
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
pair_ticks() { echo $(($(ticks "$P1") + $(ticks "$P2"))); }
lg() { taskset -c "$LOAD_CORE" "$LOADGEN" "$@"; }
field() { grep -o "\"$1\":[0-9.]*" | head -1 | cut -d: -f2; }

measure() {
  local name=$1 runs=() bytes=0 t0 t1 out
  lg connrate --target "127.0.0.1:$FRONT" --concurrency 4 --seconds 1 --size 64 >/dev/null
  t0=$(pair_ticks)
  for _ in 1 2 3; do
    out=$(lg bulk --target "127.0.0.1:$FRONT" --streams "${MTLS_STREAMS:-1}" --seconds "$BULK_SECONDS") || die "$name: bulk failed"
    runs+=("$(field gbit_per_s <<<"$out")")
    bytes=$((bytes + $(field bytes <<<"$out")))
  done
  t1=$(pair_ticks)
  printf '{"build":"%s","gbit_1_stream":%s,"runs":"%s","cpu_s_per_gb":%s}\n' "$name" \
    "$(printf '%s\n' "${runs[@]}" | sort -g | sed -n 2p)" "${runs[*]}" \
    "$(python3 -c "print(f'{($t1 - $t0) / $(getconf CLK_TCK) / ($bytes / 1e9):.3f}')")" | tee -a "$WORK/mtls.jsonl"
}

SYSCALLS="recvfrom sendto sendmsg recvmsg writev io_uring_enter"
count_syscalls() {
  local name=$1 events=raw_syscalls:sys_enter,context-switches ev out bytes role
  for ev in $SYSCALLS; do events+=",syscalls:sys_enter_$ev"; done
  lg connrate --target "127.0.0.1:$FRONT" --concurrency 4 --seconds 1 --size 64 >/dev/null
  perf stat -x, -e "$events" -p "$P2" -o "$WORK/stat-outer" & local s1=$!
  perf stat -x, -e "$events" -p "$P1" -o "$WORK/stat-inner" & local s2=$!
  sleep 0.5 # perf attached (it prints nothing to wait on)
  out=$(lg bulk --target "127.0.0.1:$FRONT" --streams 1 --seconds "$BULK_SECONDS")
  kill -INT "$s1" "$s2"; wait "$s1" "$s2" 2>/dev/null || true
  bytes=$(field bytes <<<"$out")
  for role in outer inner; do
    python3 - "$WORK/stat-$role" "$bytes" "$name" "$role" <<'EOF'
import json, sys
path, nbytes, name, role = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
mib = nbytes / (1 << 20)
row = {"build": name, "proxy": role, "mib": round(mib)}
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

# MTLS_PROFILE=1: where both proxies' CPU goes under one bulk stream (perf record, self time);
# MTLS_PROFILE=connrate: under new connections instead, 64 in flight (handshakes, resumed).
profile() {
  lg connrate --target "127.0.0.1:$FRONT" --concurrency 4 --seconds 1 --size 64 >/dev/null
  if [[ $MTLS_PROFILE == connrate ]]; then
    lg connrate --target "127.0.0.1:$FRONT" --concurrency 64 --seconds 6 --size 64 >/dev/null & local load=$!
  else
    lg bulk --target "127.0.0.1:$FRONT" --streams 1 --seconds 6 >/dev/null & local load=$!
  fi
  sleep 1
  perf record -q -e cpu-clock -g -o "$WORK/perf-$1.data" -p "$P1,$P2" -- sleep 4 >/dev/null 2>&1
  wait "$load"
  # MTLS_PROFILE_DATA=DIR keeps the recording (perf-BUILD.data) for other reports.
  if [[ -n ${MTLS_PROFILE_DATA:-} ]]; then cp "$WORK/perf-$1.data" "$MTLS_PROFILE_DATA/"; fi
  log "$1: self time, both proxies"
  perf report -i "$WORK/perf-$1.data" --stdio --no-children -g none --sort dso,sym --percent-limit 0.5 2>/dev/null |
    grep -v -e '^$' -e '^#' | head -40
  # Who wakes whom: the callers of the wake-up's unlock (MTLS_PROFILE_LINES of them; with
  # none asked, not run: a `head -0` would end the pipe and, under pipefail, the script).
  if ((${MTLS_PROFILE_LINES:-0} > 0)); then
    perf report -i "$WORK/perf-$1.data" --stdio --no-children -G --symbol-filter=_raw_spin_unlock_irqrestore \
      --percent-limit 0.3 2>/dev/null | grep -v -e '^$' -e '^#' | head -"$MTLS_PROFILE_LINES"
  fi
}

for ((round = 1; round <= ROUNDS; round++)); do
  for rs in ${MTLS_RINGSIDES:-new=$RINGSIDE}; do
    start_pair "${rs#*=}"
    if [[ -n ${MTLS_SYSCALLS:-} ]]; then count_syscalls "${rs%%=*}"
    elif [[ -n ${MTLS_PROFILE:-} ]]; then profile "${rs%%=*}"
    else measure "${rs%%=*}"; fi
    stop_pair
  done
done
