#!/usr/bin/env bash
# Peak memory of one replica while CLIENTS clients reconnect again and again with a
# Last-Event-ID from the very start of a channel that holds 1,000 events of about 64 KiB: what a
# resume costs a replica whatever the id asks for. Each client reads for up to a second, then
# drops the stream and reconnects. Usage (from the repository root):
#
#     loadtest/resume_memory.sh [BINARY] [CLIENTS] [SECONDS]
#
# BINARY defaults to target/release/sse-gateway. Prints the replica's RSS before the clients,
# its peak RSS while they loop (sampled every 100 ms), VmHWM, and the reconnects made.
set -euo pipefail

bin=${1:-target/release/sse-gateway}
clients=${2:-8}
secs=${3:-20}
events=1000
secret=resume-memory-0123456789abcdef

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
redis_port=$(free_port)
port=$(free_port)
admin=$(free_port)
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no >/dev/null &
pids+=($!)
SSE_GATEWAY_JWT_SECRET=$secret SSE_GATEWAY_REDIS_URL=redis://127.0.0.1:$redis_port \
  SSE_GATEWAY_LISTEN=127.0.0.1:$port SSE_GATEWAY_ADMIN_LISTEN=127.0.0.1:$admin \
  SSE_GATEWAY_HISTORY_SIZE=$events SSE_GATEWAY_LOG=warn "$bin" >/dev/null 2>"$work/gateway.log" &
gw=$!
pids+=("$gw")
for _ in $(seq 100); do
  curl -fs "http://127.0.0.1:$admin/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done

publisher=$(SSE_GATEWAY_JWT_SECRET=$secret "$bin" token --publish big --ttl 1h)
subscriber=$(SSE_GATEWAY_JWT_SECRET=$secret "$bin" token --sub reader --channel big --ttl 1h)
pad=$(head -c 65000 /dev/zero | tr '\0' 'x')
first=""
for i in $(seq "$events"); do
  printf '{"channel":"big","data":"%s %s"}' "$i" "$pad" >"$work/body.json"
  answer=$(curl -fs -X POST -H "Authorization: Bearer $publisher" \
    -H 'Content-Type: application/json' --data-binary @"$work/body.json" \
    "http://127.0.0.1:$port/publish")
  if [ -z "$first" ]; then
    first=$(printf '%s' "$answer" | python3 -c 'import json, sys; print(json.load(sys.stdin)["ids"]["big"])')
  fi
done

rss() { awk '/^VmRSS:/ {print $2}' "/proc/$gw/status"; }
hwm() { awk '/^VmHWM:/ {print $2}' "/proc/$gw/status"; }
before=$(rss)
end=$((SECONDS + secs))
for c in $(seq "$clients"); do
  (
    n=0
    while [ "$SECONDS" -lt "$end" ]; do
      curl -s --max-time 1 -o /dev/null -H "Authorization: Bearer $subscriber" \
        -H "Last-Event-ID: $first" "http://127.0.0.1:$port/events?channel=big" || true
      n=$((n + 1))
    done
    echo "$n" >"$work/reconnects.$c"
  ) &
done
peak=$before
while [ "$SECONDS" -lt "$end" ]; do
  now=$(rss)
  [ "$now" -gt "$peak" ] && peak=$now
  sleep 0.1
done
wait_clients=0
while [ "$(find "$work" -name 'reconnects.*' | wc -l)" -lt "$clients" ] && [ $wait_clients -lt 50 ]; do
  sleep 0.1
  wait_clients=$((wait_clients + 1))
done
reconnects=$(cat "$work"/reconnects.* 2>/dev/null | paste -sd+ | bc)
echo "binary: $bin"
echo "clients: $clients looping for ${secs}s, $reconnects reconnects from the first of $events events"
echo "RSS before: $((before / 1024)) MiB, peak while resuming: $((peak / 1024)) MiB, VmHWM: $(($(hwm) / 1024)) MiB"
