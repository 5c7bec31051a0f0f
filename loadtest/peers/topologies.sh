#!/usr/bin/env bash
# sse-gateway on one Redis and on a 3-master Redis Cluster (3 masters + 3 replicas), measured
# in the same run: two replicas on each, the same load through each.
#
#   loadtest/peers/topologies.sh
#
# Settings (environment):
#   STREAMS   streams of the private-channel run (default 5000)
#   RATE      durable events per second of that run (default 2000)
#   OUT       reports (default target/topologies)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
streams=${STREAMS:-5000}
rate=${RATE:-2000}
out=${OUT:-$root/target/topologies}
export SSE_GATEWAY_JWT_SECRET=topologies-secret-0123456789abcdef
mkdir -p "$out"
name=topologies
# shellcheck source=loadtest/peers/lib.sh
. "$here/lib.sh"

redis() { # port, extra args...
  local port=$1
  shift
  redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --protected-mode no \
    --dir "$dir" --logfile "$dir/redis-$port.log" "$@" &
  pids+=($!)
}

(cd "$root" && cargo build --release --workspace -q)
tool=$root/target/release/sse-loadtest

single=$(free_port)
redis "$single"
cluster=()
for _ in 1 2 3 4 5 6; do
  p=$(free_port)
  cluster+=("127.0.0.1:$p")
  redis "$p" --cluster-enabled yes --cluster-config-file "$dir/nodes-$p.conf"
done
sleep 0.5
redis-cli --cluster create "${cluster[@]}" --cluster-replicas 1 --cluster-yes >/dev/null
for _ in $(seq 1 100); do
  redis-cli -p "${cluster[0]#*:}" CLUSTER INFO | grep -q cluster_state:ok && break
  sleep 0.1
done

start_pair() { # redis url -> "client,client admin,admin pid,pid"
  local url=$1 clients=() admins=() ps=()
  for _ in 1 2; do
    local c a
    c=$(free_port)
    a=$(free_port)
    SSE_GATEWAY_LOG=warn SSE_GATEWAY_REDIS_URL=$url SSE_GATEWAY_LISTEN=127.0.0.1:$c \
      SSE_GATEWAY_ADMIN_LISTEN=127.0.0.1:$a "$root/target/release/sse-gateway" 2>>"$dir/gateway.log" &
    pids+=($!)
    ps+=($!)
    clients+=("127.0.0.1:$c")
    admins+=("127.0.0.1:$a")
    for _ in $(seq 1 100); do
      curl -fsS -o /dev/null "http://127.0.0.1:$a/readyz" 2>/dev/null && break
      sleep 0.1
    done
  done
  echo "$(IFS=,; echo "${clients[*]}") $(IFS=,; echo "${ps[*]}")"
}

read -r single_targets single_pids < <(start_pair "redis://127.0.0.1:$single")
read -r cluster_targets cluster_pids < <(start_pair "redis+cluster://$(IFS=,; echo "${cluster[*]}")")

for topo in single cluster; do
  if [ $topo = single ]; then targets=$single_targets gpids=$single_pids; else targets=$cluster_targets gpids=$cluster_pids; fi
  echo "== $topo: durable publish throughput (POST /publish, 32 publishers over 2 replicas)" >&2
  "$tool" publish --targets "$targets" --via http --events 40000 --concurrency 32 --channel "pub-$topo"
  echo "== $topo: $streams private channels, $rate durable events/s" >&2
  "$tool" private --targets "$targets" --pids "$gpids" --via http --streams "$streams" \
    --events $((rate * 10)) --rate "$rate" --label "sse-gateway ($topo Redis)" \
    --channel "p-$topo" --json "$out/private-$topo.json" --html "$out/private-$topo.html" || true
done
"$tool" table "$out/private-single.json" "$out/private-cluster.json" | tee "$out/table.md"
