#!/usr/bin/env bash
# CPU per short mTLS connection of several ringside builds, each as perf/run.sh's
# ringside-2-mtls pair (outbound sidecar → TLS 1.3 with client certificates → inbound sidecar
# → sink), all pairs running at once (idle unless loaded) and loaded in turn, 1 s per shape
# (C=1, 16, 64 with the client closing first, C=32 with the backend closing first), the order
# reversed every other round. The machine drifts ±10 % between rounds here, so builds are
# compared within a round: per round, each build's pooled µs per connection over the first
# build's, then the median over rounds (issue #31's A/B method, perf/RESULTS.md).
#   MTLS_AB="base=/work/base/ringside-7c5cba5 new=target/release/ringside" \
#     flock /tmp/perf.lock perf/mtls-ab.sh [ROUNDS]
# MTLS_AB_SHAPES="1:client 64:client" narrows the shapes. Both proxies of every pair on
# core 1, loadgen and its sink on core 0; ports 18600-18700. A build may be a script that
# execs a binary (to set an environment variable): its pid is the proxy's.
source "$(dirname "$0")/harness.sh"
source "$(dirname "$0")/certs.sh"

ROUNDS=${1:-10}
LOAD_CORE=0; PROXY_CORE=1; BACKEND=18600
SHAPES=${MTLS_AB_SHAPES:-"1:client 16:client 64:client 32:backend"}
[[ -n ${MTLS_AB:-} ]] || die "MTLS_AB=\"name=binary ...\" is required"

build
spawn taskset -c "$LOAD_CORE" "$LOADGEN" echo-server --listen "127.0.0.1:$BACKEND" --seconds 3600 >/dev/null
d=$WORK/certs
mesh_certs "$d" productpage ratings
lg() { taskset -c "$LOAD_CORE" "$LOADGEN" "$@"; }
field() { grep -o "\"$1\":[0-9.]*" | head -1 | cut -d: -f2; }
wait_port() {
  for ((i = 0; i < 200; i++)); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done
  die "nothing listens on $1"
}
# CPU time (ns) of the given processes, all their threads, from schedstat.
cpu_ns() {
  local total=0 p f run rest
  for p in $1; do
    for f in /proc/"$p"/task/*/schedstat; do read -r run rest <"$f"; total=$((total + run)); done
  done
  echo "$total"
}

declare -A PIDS_OF FRONT_OF
names=()
k=0
for build in $MTLS_AB; do
  name=${build%%=*}; bin=${build#*=}; names+=("$name")
  front=$((18601 + 10 * k)); inner=$((18602 + 10 * k)); k=$((k + 1))
  mtls_pair_configs "$d" "$BACKEND" "$inner" "$front" "$WORK/inner-$name.yaml" "$WORK/outer-$name.yaml"
  RUST_LOG=warn spawn taskset -c "$PROXY_CORE" "$bin" run --config "$WORK/inner-$name.yaml" 2>>"$WORK/ringside.log"
  p1=$LAST_PID; wait_port "$inner"
  RUST_LOG=warn spawn taskset -c "$PROXY_CORE" "$bin" run --config "$WORK/outer-$name.yaml" 2>>"$WORK/ringside.log"
  p2=$LAST_PID; wait_port "$front"
  PIDS_OF[$name]="$p1 $p2"; FRONT_OF[$name]=$front
  # Warm: first handshakes are full ones; later ones resume.
  lg connrate --target "127.0.0.1:$front" --concurrency 4 --seconds 1 --size 64 >/dev/null
done

# One line per round and shape: name=ns_per_connection/connections for each build.
: >"$WORK/ab.log"
for ((round = 1; round <= ROUNDS; round++)); do
  order=("${names[@]}")
  ((round % 2 == 0)) && mapfile -t order < <(printf '%s\n' "${names[@]}" | tac)
  for shape in $SHAPES; do
    c=${shape%%:*}; closer=${shape#*:}; line="$round C$c-$closer"
    for name in "${order[@]}"; do
      a0=$(cpu_ns "${PIDS_OF[$name]}")
      n=$(lg connrate --target "127.0.0.1:${FRONT_OF[$name]}" --concurrency "$c" --seconds 1 --size 64 \
        --closer "$closer" | field connections)
      a1=$(cpu_ns "${PIDS_OF[$name]}")
      ((n > 0)) || die "$name: no connection at C=$c"
      line+=" $name=$(((a1 - a0) / n))/$n"
    done
    echo "$line" | tee -a "$WORK/ab.log" >&2
  done
done

python3 - "$WORK/ab.log" "${names[0]}" <<'EOF'
import statistics, sys
from collections import defaultdict
path, first = sys.argv[1], sys.argv[2]
pooled = defaultdict(lambda: defaultdict(lambda: [0, 0]))   # build -> round -> [ns, conns]
shape_ratio = defaultdict(lambda: defaultdict(list))        # build -> shape -> [ratio]
for line in open(path):
    rnd, shape, *cells = line.split()
    vals = {}
    for cell in cells:
        name, v = cell.split("=")
        ns, n = map(int, v.split("/"))
        vals[name] = ns
        pooled[name][rnd][0] += ns * n
        pooled[name][rnd][1] += n
    for name, ns in vals.items():
        if name != first:
            shape_ratio[name][shape].append(ns / vals[first])
us = lambda name, r: pooled[name][r][0] / pooled[name][r][1] / 1000
for name in pooled:
    print(f"{name}: pooled µs per connection, median over rounds {statistics.median(us(name, r) for r in pooled[name]):.0f}")
for name in pooled:
    if name == first:
        continue
    ratios = [us(name, r) / us(first, r) for r in pooled[name]]
    print(f"{name} / {first}: per round {' '.join(f'{x:.3f}' for x in ratios)}; median {statistics.median(ratios):.3f}")
    for shape, rs in shape_ratio[name].items():
        print(f"  {shape}: median {statistics.median(rs):.3f}")
EOF
