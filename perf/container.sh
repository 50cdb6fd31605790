#!/usr/bin/env bash
# The sidecar image under podman: its size, start-to-ready (from `podman run -d` until the
# container's /healthz/ready answers 200 in its pod's namespace; split at the container's
# StartedAt into podman's part and ringside's) and RSS with no traffic (2 s
# after ready), over N starts, with docker/k8s/'s limits (1 CPU: one worker; 128 MiB).
#   perf/container.sh [N]        (default 5; as root, after `bash docker/build-local.sh podman`)
#   ENGINE_ARGS="--runtime runc --ulimit nofile=20000:20000 --ulimit nproc=4096:4096"
#                                (the default: what this kind of machine needs, docker/README.md)
set -euo pipefail
N=${1:-5}
engine_args=${ENGINE_ARGS:---runtime runc --ulimit nofile=20000:20000 --ulimit nproc=4096:4096}
read -ra engine_args <<<"$engine_args"
ns=rs-perf-$$
name=rs-perf-$$
tmp=$(mktemp -d)
chmod 755 "$tmp"   # the sidecar (uid 1337) reads its config there
cleanup() {
  podman rm -f -t 0 "$name" >/dev/null 2>&1 || true
  ip netns del "$ns" 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT
ip netns add "$ns"
ip -n "$ns" link set lo up
cat >"$tmp/ringside.yaml" <<'EOF'
node: {workload_name: redis-v1, namespace: default, labels: {app: redis, version: v1}}
metrics: {listen: 0.0.0.0:15090}
admin: {listen: 127.0.0.1:15000}
health: {listen: 0.0.0.0:15021}
listeners:
  - {name: virtual-outbound, listen: 0.0.0.0:15001, direction: outbound, capture: outbound}
  - {name: virtual-inbound, listen: 0.0.0.0:15006, direction: inbound, capture: inbound}
clusters: []
EOF
size=$(podman image inspect --format '{{.Size}}' ringside:dev)
echo "image ringside:dev: $size bytes ($((size / 1024 / 1024)) MiB); ringside-init:dev: $(podman image inspect --format '{{.Size}}' ringside-init:dev) bytes"
for ((i = 1; i <= N; i++)); do
  start=$(date +%s%N)
  podman run -d --name "$name" "${engine_args[@]}" --network "ns:/run/netns/$ns" --read-only \
    --cap-drop ALL --cpus 1 --memory 128m --volume "$tmp:/etc/ringside:ro" ringside:dev >/dev/null
  for _ in $(seq 2000); do
    ip netns exec "$ns" curl -sf -o /dev/null http://127.0.0.1:15021/healthz/ready && break
    sleep 0.005
  done
  ready=$(date +%s%N)
  sleep 2
  pid=$(podman inspect --format '{{.State.Pid}}' "$name")
  started=$(date -d "$(podman inspect --format '{{.State.StartedAt}}' "$name" | cut -d' ' -f1,2)" +%s%N)
  rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status")
  echo "start $i: start-to-ready $(((ready - start) / 1000000)) ms" \
    "(podman's part $(((started - start) / 1000000)) ms, then ringside $(((ready - started) / 1000000)) ms)," \
    "idle RSS $rss KiB"
  podman rm -f -t 5 "$name" >/dev/null
done
