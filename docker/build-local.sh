#!/usr/bin/env bash
# Build ringside's two images with no registry, from a local build: `ringside:dev` (the
# sidecar) and `ringside-init:dev` (Istio's istio-init: `ringside iptables --apply`), both
# `FROM scratch` (docker/Dockerfile.local), with the layout of docker/Dockerfile's
# registry-based build: uid 1337, /usr/local/bin/ringside, Istio's ports, the init image
# with iptables.
#
# Usage: docker/build-local.sh [podman|docker] [--workloads]
#   podman|docker   the engine (default: podman)
#   --workloads     also build stand-ins for the workloads' images, so docker/k8s/ and
#                   compose.yaml run offline: `localhost/redis:7-bookworm` (for
#                   redis:7-bookworm) from Debian's redis-server, redis-cli, redis-benchmark,
#                   sh and sleep (packages redis-server, redis-tools), and
#                   `localhost/prometheus:debian` (for prom/prometheus, with its layout:
#                   /bin/prometheus, working directory /prometheus) from Debian's prometheus
#   RINGSIDE_BIN=path   put this binary in the images instead of building one (the tests
#                   use their debug build: a release build takes minutes); default:
#                   `cargo build --release --locked --bin ringside`, target/release/ringside
#   TAG=dev         the images' tag
# A static binary goes in alone; a dynamic one goes in with exactly the shared libraries
# `ldd` names, at the paths it names. The init image carries this machine's iptables
# (iptables-nft: xtables-nft-multi, its extensions and libraries) and `ip` the same way.
# Debug info is stripped from the copy (`strip --strip-debug`); the binary is not changed.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
engine=podman
workloads=0
while (($#)); do
  case $1 in
    podman|docker) engine=$1 ;;
    --workloads) workloads=1 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "build-local: unknown argument $1 (see --help)" >&2; exit 64 ;;
  esac
  shift
done
tag=${TAG:-dev}
die() { echo "build-local: $*" >&2; exit 1; }
command -v "$engine" >/dev/null || die "$engine is not installed"
command -v ldd >/dev/null || die "ldd is not installed (libc-bin)"

bin=${RINGSIDE_BIN:-}
if [[ -z $bin ]]; then
  (cd "$repo" && cargo build --release --locked --bin ringside)
  bin=$repo/target/release/ringside
fi
[[ -x $bin ]] || die "$bin is not an executable"

stage=$(mktemp -d "${TMPDIR:-/tmp}/ringside-image.XXXXXX")
trap 'rm -rf "$stage"' EXIT

# The shared libraries (and the dynamic loader) `ldd` names for $1, one path a line; none for
# a static binary.
libraries() {
  local out
  out=$(ldd "$1" 2>&1) || { [[ $out == *"not a dynamic executable"* || $out == *"statically linked"* ]] && return 0; die "ldd $1: $out"; }
  [[ $out != *"not found"* ]] || die "ldd $1: a library is missing: $out"
  awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' <<<"$out"
}

# copy FILE ROOT [DEST]: FILE (symlinks followed) to ROOT/DEST (default: its own path),
# with its libraries at the paths ldd names.
copy() {
  local file=$1 root=$2 dest=${3:-$1} libs lib
  libs=$(libraries "$file")   # an assignment, so a failing ldd stops the script
  install -D -m 0755 "$(readlink -f "$file")" "$root$dest"
  for lib in $libs; do
    [[ -e $root$lib ]] || install -D -m 0755 "$(readlink -f "$lib")" "$root$lib"
  done
}

for root in "$stage/sidecar" "$stage/init"; do
  copy "$bin" "$root" /usr/local/bin/ringside
  if command -v strip >/dev/null; then strip --strip-debug "$root/usr/local/bin/ringside"; fi
done

# The init image: iptables-nft under the names ringside runs (`iptables`, `ip6tables`), its
# extensions (loaded at run time, so ldd does not name them) and `ip` (for --ipv6).
multi=$(command -v xtables-nft-multi) || die "xtables-nft-multi is missing (Debian's iptables)"
copy "$multi" "$stage/init" /usr/sbin/xtables-nft-multi
for name in iptables iptables-save iptables-restore ip6tables ip6tables-save ip6tables-restore; do
  ln -s xtables-nft-multi "$stage/init/usr/sbin/$name"
done
xtables=$(dirname "$(readlink -f "$(libraries "$multi" | grep /libxtables)")")/xtables
[[ -d $xtables ]] || die "no iptables extensions at $xtables"
for ext in "$xtables"/*.so; do copy "$ext" "$stage/init"; done
ip=$(command -v ip) || die "ip is missing (iproute2)"
copy "$ip" "$stage/init" /usr/sbin/ip

cd "$repo"
"$engine" build -f docker/Dockerfile.local --target init -t "ringside-init:$tag" "$stage"
"$engine" build -f docker/Dockerfile.local -t "ringside:$tag" "$stage"

if ((workloads)); then
  for tool in redis-server redis-cli redis-benchmark sh sleep; do
    path=$(command -v "$tool") || die "$tool is missing (apt-get install redis-server redis-tools)"
    copy "$path" "$stage/redis" "/usr/bin/$tool"
  done
  mkdir -p "$stage/redis/data" "$stage/redis/tmp"
  printf 'FROM scratch\nCOPY redis/ /\nENV PATH=/usr/bin\nWORKDIR /data\nCMD ["redis-server"]\n' \
    >"$stage/Containerfile.redis"
  "$engine" build -f "$stage/Containerfile.redis" -t localhost/redis:7-bookworm "$stage"
  path=$(command -v prometheus) || die "prometheus is missing (apt-get install prometheus)"
  copy "$path" "$stage/prometheus" /bin/prometheus
  mkdir -p "$stage/prometheus/prometheus"
  printf '%s\n' 'FROM scratch' 'COPY prometheus/ /' 'WORKDIR /prometheus' 'EXPOSE 9090' \
    'ENTRYPOINT ["/bin/prometheus"]' 'CMD ["--config.file=/etc/prometheus/prometheus.yml"]' \
    >"$stage/Containerfile.prometheus"
  "$engine" build -f "$stage/Containerfile.prometheus" -t localhost/prometheus:debian "$stage"
fi
