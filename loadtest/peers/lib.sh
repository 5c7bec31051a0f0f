# Shared by the peer scripts (sourced, not run): a scratch directory, processes killed at exit,
# and free loopback ports. Set `name` before sourcing; `pids` collects what `cleanup` kills.
# shellcheck shell=bash
dir=$(mktemp -d "/tmp/sse-${name:-peers}.XXXXXX")
pids=()

cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
