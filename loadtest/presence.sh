#!/usr/bin/env bash
# What presence costs per connect and per close: churn (connect, first bytes, close, each time a
# new user) on a channel without presence and on a presence channel, alternating, on one
# replica and its own Redis; gateway CPU from /proc, Redis CPU from INFO, per connect.
#
#   loadtest/presence.sh               # 3 rounds of 10 s each way
#   ROUNDS=5 SECS=20 loadtest/presence.sh
#
# Every connect is also a close (churn closes each stream once its first bytes are in), so on
# the presence channel with a new user per connect (the worst case) each connect is one join and
# one leave; with returning users (`+returning`: each loop reconnects as its own user within the
# grace, as after a reconnect storm) it is the bookkeeping alone.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
rounds=${ROUNDS:-3}
secs=${SECS:-10}
concurrency=${CONCURRENCY:-32}
redis_port=${REDIS_PORT:-6395}
port=${PORT:-18181}
export SSE_GATEWAY_JWT_SECRET=presence-bench-secret-0123456789
name=presence
# shellcheck source=loadtest/peers/lib.sh
. "$here/peers/lib.sh"

command -v redis-server >/dev/null || apt-get install -y -q redis-server >/dev/null
(cd "$root" && cargo build --release --workspace -q)
bin=$root/target/release/sse-gateway
tool=$root/target/release/sse-loadtest

start_redis "$redis_port"

SSE_GATEWAY_REDIS_URL="redis://127.0.0.1:$redis_port" \
SSE_GATEWAY_LISTEN="127.0.0.1:$port" SSE_GATEWAY_ADMIN_LISTEN="127.0.0.1:$((port + 1000))" \
SSE_GATEWAY_PRESENCE_CHANNELS='room:*' SSE_GATEWAY_PRESENCE_LEAVE_GRACE_SECS=5 \
SSE_GATEWAY_LOG=warn "$bin" >"$dir/gateway.log" 2>&1 &
pids+=($!)
gw_pid=$!
wait_for "http://127.0.0.1:$((port + 1000))/readyz" -f

ticks=$(getconf CLK_TCK)
cpu_of() { # pid -> CPU seconds used so far (user + system)
  awk -v t="$ticks" '{ printf "%.3f", ($14 + $15) / t }' "/proc/$1/stat"
}
redis_cpu() {
  redis-cli -p "$redis_port" info cpu | tr -d '\r' |
    awk -F: '/^used_cpu_(sys|user):/ { s += $2 } END { printf "%.3f", s }'
}
presence_events() {
  curl -fsS "http://127.0.0.1:$((port + 1000))/metrics" |
    awk '/^sse_gateway_presence_events_total/ { s += $2 } END { printf "%d", s }'
}

printf '| round | channel | connects/s | p99 connect (ms) | gateway CPU per connect (µs) | Redis CPU per connect (µs) | joins + leaves told |\n'
printf '|---|---|---|---|---|---|---|\n'
for round in $(seq 1 "$rounds"); do
  for variant in load room:churn room:churn+returning; do
    channel=${variant%+returning}
    extra=()
    [ "$variant" = "$channel" ] || extra=(--returning-users)
    g0=$(cpu_of "$gw_pid"); r0=$(redis_cpu); e0=$(presence_events)
    "$tool" churn --targets "127.0.0.1:$port" --concurrency "$concurrency" --secs "$secs" \
      --channel "$channel" "${extra[@]}" --json "$dir/churn.json" >"$dir/churn.out" 2>&1
    # Leaves fall due a grace after the last close: let them be told before reading.
    [ "$channel" = load ] || sleep 6
    g1=$(cpu_of "$gw_pid"); r1=$(redis_cpu); e1=$(presence_events)
    python3 - "$dir/churn.json" "$g0" "$g1" "$r0" "$r1" "$e0" "$e1" "$round" "$variant" "$secs" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
g0, g1, r0, r1 = map(float, sys.argv[2:6])
e0, e1 = int(sys.argv[6]), int(sys.argv[7])
rate = report.get("connects_per_sec") or 0.0
connects = sum(x.get("connects", 0) for x in report.get("series", [])) or rate * float(sys.argv[10])
p99 = (report.get("connect_ms") or {}).get("p99", float("nan"))
n = float(connects or 0) or 1.0
print(f"| {sys.argv[8]} | `{sys.argv[9]}` | {rate:,.0f} | {p99:.2f} | {(g1 - g0) * 1e6 / n:.0f} | {(r1 - r0) * 1e6 / n:.1f} | {e1 - e0:,} |")
PY
  done
done
