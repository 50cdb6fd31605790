#!/usr/bin/env bash
# Soak: mixed traffic through two sidecars with the peer exchange on for SECONDS (default
# 600): bulk streams, short connections, idle churn (1,000 connections opened, held 10 s,
# closed, again), both sidecars scraped every second. RSS and CPU of each sidecar sampled
# every 10 s into perf/out/soak.csv; the RSS slope after warm-up (the first fifth) is
# reported per sidecar. Afterwards: opened == closed in both reporters, and both agree on bytes.
#   perf/soak.sh [SECONDS]      (tests/soak.rs runs a one-minute variant in the suite)
source "$(dirname "$0")/harness.sh"

DURATION=${1:-600}
BACKEND=18400; INNER=18401; OUTER=18402; INNER_ADMIN=18403; OUTER_ADMIN=18404
OUT=$HERE/out
mkdir -p "$OUT"
CSV=$OUT/soak.csv

build
echo_backend $BACKEND
sidecar inbound inbound $INNER $BACKEND $INNER_ADMIN --workers 1 --tcp-reporting-duration 5s
INNER_PID=$LAST_PID
sidecar outbound outbound $OUTER $INNER $OUTER_ADMIN --workers 1 --tcp-reporting-duration 5s
OUTER_PID=$LAST_PID
end=$(( $(date +%s) + DURATION ))
target=127.0.0.1:$OUTER

# Each loop stops at the deadline; every loadgen run is bounded by its own --seconds.
left() { echo $(( end - $(date +%s) )); }
traffic() {
  local kind=$1 out=$WORK/$1.jsonl
  while (( $(left) > 2 )); do
    local s=$(( $(left) < 20 ? $(left) - 1 : 20 ))
    case $kind in
      bulk) "$LOADGEN" bulk --target "$target" --streams 1 --seconds "$s" --max-bytes $((2 << 30)) ;;
      short) "$LOADGEN" connrate --target "$target" --concurrency 4 --seconds "$s" --size 512 ;;
      idle) "$LOADGEN" idle --target "$target" --connections 1000 --hold-seconds "$(( s < 10 ? s : 10 ))" --open-seconds 10 ;;
    esac >>"$out" || true
  done
}
scrapes=0 scrape_failures=0
scraper() {
  local ok=0 bad=0
  while (( $(left) > 0 )); do
    if scrape $OUTER_ADMIN >/dev/null && scrape $INNER_ADMIN >/dev/null; then ok=$((ok + 1)); else bad=$((bad + 1)); fi
    sleep 1
  done
  echo "$ok $bad" >"$WORK/scrapes"
}
for kind in bulk short idle; do traffic $kind & PIDS+=($!); done
scraper & PIDS+=($!)

log "soaking for ${DURATION}s; samples every 10 s in $CSV"
echo "seconds,outbound_rss_kib,outbound_cpu_ticks,inbound_rss_kib,inbound_cpu_ticks" >"$CSV"
t0=$(date +%s)
while (( $(left) > 0 )); do
  echo "$(( $(date +%s) - t0 )),$(rss_kib $OUTER_PID),$(cpu_ticks $OUTER_PID),$(rss_kib $INNER_PID),$(cpu_ticks $INNER_PID)" >>"$CSV"
  sleep 10
done
wait "${PIDS[@]:3}" 2>/dev/null || true  # the traffic loops and the scraper
read -r scrapes scrape_failures <"$WORK/scrapes"

# Traffic has stopped: every connection closes and is reported (bounded wait).
status=0
for ((i = 0; i < 300; i++)); do
  o=$(metric_sum $OUTER_ADMIN istio_tcp_connections_opened_total reporter=source)
  c=$(metric_sum $OUTER_ADMIN istio_tcp_connections_closed_total reporter=source)
  o2=$(metric_sum $INNER_ADMIN istio_tcp_connections_opened_total reporter=destination)
  c2=$(metric_sum $INNER_ADMIN istio_tcp_connections_closed_total reporter=destination)
  [[ $o == "$c" && $o2 == "$c2" && $o == "$o2" ]] && break
  sleep 0.1
done
r=$(metric_sum $OUTER_ADMIN istio_tcp_received_bytes_total reporter=source)
r2=$(metric_sum $INNER_ADMIN istio_tcp_received_bytes_total reporter=destination)
s=$(metric_sum $OUTER_ADMIN istio_tcp_sent_bytes_total reporter=source)
s2=$(metric_sum $INNER_ADMIN istio_tcp_sent_bytes_total reporter=destination)
echo "soak: source opened $o closed $c, received $r sent $s bytes"
echo "soak: destination opened $o2 closed $c2, received $r2 sent $s2 bytes"
echo "soak: $scrapes scrape rounds ok, $scrape_failures failed"
[[ $o == "$c" && $o2 == "$c2" && $o == "$o2" && $r == "$r2" && $s == "$s2" && $scrape_failures == 0 ]] || status=1

# Slope of RSS (KiB per minute) and mean CPU (% of a core) after warm-up, per sidecar.
python3 - "$CSV" <<'EOF'
import csv, sys
rows = [list(map(float, r)) for r in list(csv.reader(open(sys.argv[1])))[1:]]
if len(rows) < 4:
    sys.exit("soak: too few samples")
warm = rows[len(rows) // 5:]
def slope(xs, ys):
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs) or 1.0
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den
t = [r[0] for r in warm]
for name, rss, cpu in (("outbound", 1, 2), ("inbound", 3, 4)):
    s = slope(t, [r[rss] for r in warm]) * 60
    busy = (warm[-1][cpu] - warm[0][cpu]) / max(warm[-1][0] - warm[0][0], 1)  # ticks/s = % core
    print(f"soak: {name}: RSS {rows[0][rss]:.0f} -> {rows[-1][rss]:.0f} KiB, slope after warm-up {s:+.1f} KiB/min, CPU {busy:.0f}% of a core")
EOF
exit $status
