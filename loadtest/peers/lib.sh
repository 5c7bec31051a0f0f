# Shared by the load scripts (sourced, not run): a scratch directory, processes killed at exit,
# free loopback ports, throwaway Redis servers and waiting for a server to answer. Set `name`
# before sourcing; `pids` collects what `cleanup` kills.
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

# Waits (20 s at most) until `url` answers; extra arguments go to curl (`-f`: until it answers
# 2xx, e.g. a replica's /readyz). Exits, naming the logs, when it never does.
wait_for() { # url [curl options]
  local url=$1
  shift
  for _ in $(seq 1 200); do
    if curl -sS -o /dev/null --max-time 1 "$@" "$url" 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "$(basename "$0"): $url did not come up; logs are in $dir" >&2
  exit 1
}

# A throwaway Redis on loopback `port`, nothing on disk, killed at exit; returns once it answers.
start_redis() { # port
  redis-server --port "$1" --bind 127.0.0.1 --save '' --appendonly no --maxclients 20000 \
    --logfile "$dir/redis-$1.log" &
  pids+=($!)
  for _ in $(seq 1 100); do
    redis-cli -p "$1" ping >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "$(basename "$0"): Redis on port $1 did not come up; see $dir/redis-$1.log" >&2
  exit 1
}
