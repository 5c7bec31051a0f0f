#!/usr/bin/env bash
# A reconnect storm on a presence channel: three replicas on one Redis, 25,000 streams (one user
# each) on `room:storm`, the victim holding 15,000; durable events at 2/s; SIGKILL to the victim
# 5 s in. Its clients reconnect to the others within seconds. Reports the storm's audit (what the
# clients received) and how many joins and leaves the storm caused: the grace and the lease
# should absorb all of them.
#
#   loadtest/presence_storm.sh
#   STREAMS=6000 LEASE=10 loadtest/presence_storm.sh     # smaller, quicker
#   CHANNEL=storm loadtest/presence_storm.sh              # the same storm without presence
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
streams=${STREAMS:-25000}
lease=${LEASE:-30}
grace=${GRACE:-5}
channel=${CHANNEL:-room:storm}
redis_port=${REDIS_PORT:-6396}
port=${PORT:-18281}
export SSE_GATEWAY_JWT_SECRET=presence-storm-secret-0123456789
name=presence-storm
# shellcheck source=loadtest/peers/lib.sh
. "$here/peers/lib.sh"

command -v redis-server >/dev/null || apt-get install -y -q redis-server >/dev/null
(cd "$root" && cargo build --release --workspace -q)
bin=$root/target/release/sse-gateway
tool=$root/target/release/sse-loadtest

start_redis "$redis_port"

replica_pids=()
for i in 1 2 3; do
  SSE_GATEWAY_REDIS_URL="redis://127.0.0.1:$redis_port" \
  SSE_GATEWAY_LISTEN="127.0.0.1:$((port + i))" SSE_GATEWAY_ADMIN_LISTEN="127.0.0.1:$((port + 1000 + i))" \
  SSE_GATEWAY_PRESENCE_CHANNELS='room:*' SSE_GATEWAY_PRESENCE_LEAVE_GRACE_SECS="$grace" \
  SSE_GATEWAY_CONNECTION_LEASE_SECS="$lease" SSE_GATEWAY_HISTORY_SIZE=100000 \
  SSE_GATEWAY_MAX_CONNECTIONS_PER_USER=2 SSE_GATEWAY_LOG=warn \
    "$bin" >"$dir/replica$i.log" 2>&1 &
  pids+=($!)
  replica_pids+=($!)
done
for i in 1 2 3; do
  wait_for "http://127.0.0.1:$((port + 1000 + i))/readyz" -f
done

events_of() { # admin port, kind
  curl -fsS "http://127.0.0.1:$1/metrics" 2>/dev/null |
    awk -v k="$2" '$1 == "sse_gateway_presence_events_total{kind=\"" k "\"}" { s += $2 } END { printf "%d", s }'
}
total() { # kind, over the two survivors
  echo $(( $(events_of $((port + 1001)) "$1") + $(events_of $((port + 1002)) "$1") ))
}

victim=${replica_pids[2]}
# Three list entries of five for the victim: it holds 3/5 of the streams.
targets="127.0.0.1:$((port + 3)),127.0.0.1:$((port + 3)),127.0.0.1:$((port + 3)),127.0.0.1:$((port + 1)),127.0.0.1:$((port + 2))"
# The figures just before the kill, and once the victim's lease, a sweep and the grace have all
# passed (the streams are still open then: the run lasts past it).
settle=$((lease + lease / 3 + grace + 3))
secs=$((5 + settle + 5))
(
  sleep 4.5
  echo "$(total join) $(total leave)" >"$dir/before"
  sleep $((settle - 1)).5
  echo "$(total join) $(total leave)" >"$dir/after"
  # Every join and leave ever told on the channel, read from its history (the victim's own
  # counters died with it): one join per user and no leave means the storm caused none.
  redis-cli -p "$redis_port" --raw EVAL "
    local joins, leaves = 0, 0
    for _, e in ipairs(redis.call('XRANGE', KEYS[1], '-', '+')) do
      local p = e[2][2]
      if string.sub(p, 1, 7) == '\0P\0join' then joins = joins + 1
      elseif string.sub(p, 1, 8) == '\0P\0leave' then leaves = leaves + 1 end
    end
    return { joins, leaves }" 1 "{sse:$channel}:history" | tr '\n' ' ' >"$dir/history"; echo >>"$dir/history"
  curl -fsS -H "Authorization: Bearer $("$bin" token --sub observer --channel 'room:*')" \
    "http://127.0.0.1:$((port + 1))/presence?channel=$channel" |
    python3 -c 'import json,sys; v=json.load(sys.stdin); print(v["users"], v["connections"])' >"$dir/snapshot" ||
    echo "(not a presence channel)" >"$dir/snapshot"
) &
"$tool" storm --targets "$targets" --streams "$streams" --workers 2 \
  --source-ips 127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5 --channel "$channel" \
  --redis-url "redis://127.0.0.1:$redis_port" --secs "$secs" --rate 2 --kill-after-secs 5 \
  --kill-pid "$victim" --json "$dir/storm.json" | tee "$dir/storm.out"
read -r joins0 leaves0 <"$dir/before"
read -r joins1 leaves1 <"$dir/after"
read -r all_joins all_leaves <"$dir/history"
echo "presence: ${all_joins} joins and ${all_leaves} leaves in the channel's history ${settle}s after the kill (lease ${lease}s + a sweep + grace ${grace}s), for ${streams} users; the survivors told $((joins1 - joins0)) joins and $((leaves1 - leaves0)) leaves from 0.5 s before the kill; snapshot then (users, connections): $(cat "$dir/snapshot")"
