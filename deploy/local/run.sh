#!/usr/bin/env bash
# A three-replica sse-gateway on this machine, no containers: redis-server, three replicas and
# nginx in front of them, all on loopback.
#
#   deploy/local/run.sh start    # start everything, print the URLs and a demo
#   deploy/local/run.sh stop     # stop everything this script started
#
# Settings (environment):
#   SSE_LOCAL_PORT        nginx port; replicas use PORT+1..PORT+3, their admin ports PORT+1001..
#                         (default 8080)
#   SSE_LOCAL_REDIS_PORT  redis-server port (default 6380)
#   SSE_LOCAL_DIR         state: pids, logs, generated configs (default /tmp/sse-gateway-local)
#   SSE_GATEWAY_BIN       the sse-gateway binary (default: target/release/sse-gateway, built if
#                         missing)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
port=${SSE_LOCAL_PORT:-8080}
redis_port=${SSE_LOCAL_REDIS_PORT:-6380}
dir=${SSE_LOCAL_DIR:-/tmp/sse-gateway-local}

need() {
  command -v "$1" >/dev/null 2>&1 || { echo "run.sh: $1 is not installed (apt-get install $2)" >&2; exit 1; }
}

wait_for() { # url, what
  for _ in $(seq 1 100); do
    if curl -fsS -o /dev/null "$1" 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "run.sh: $2 did not come up ($1); logs are in $dir" >&2
  return 1
}

stop() {
  for f in "$dir"/*.pid; do
    [ -e "$f" ] || continue
    pid=$(cat "$f")
    kill "$pid" 2>/dev/null || true
    rm -f "$f"
  done
  echo "stopped (logs kept in $dir)"
}

start() {
  need redis-server redis-server
  need nginx nginx-light
  need curl curl
  bin=${SSE_GATEWAY_BIN:-$root/target/release/sse-gateway}
  if [ ! -x "$bin" ]; then
    echo "building $bin ..."
    (cd "$root" && cargo build --release --bin sse-gateway)
  fi
  mkdir -p "$dir"
  stop >/dev/null

  redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
    >"$dir/redis.log" 2>&1 &
  echo $! >"$dir/redis.pid"
  for _ in $(seq 1 100); do
    redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break
    sleep 0.1
  done

  secret_file="$dir/jwt-secret"
  [ -s "$secret_file" ] || head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$secret_file"
  export SSE_GATEWAY_JWT_SECRET
  SSE_GATEWAY_JWT_SECRET=$(cat "$secret_file")
  export SSE_GATEWAY_REDIS_URL="redis://127.0.0.1:$redis_port"
  # The demo page keeps its token in this cookie, never in a URL.
  export SSE_GATEWAY_AUTH_COOKIE=sse_token
  # Rooms track who is on them (the chat page).
  export SSE_GATEWAY_PRESENCE_CHANNELS='room:*'

  for i in 1 2 3; do
    SSE_GATEWAY_LISTEN="127.0.0.1:$((port + i))" \
    SSE_GATEWAY_ADMIN_LISTEN="127.0.0.1:$((port + 1000 + i))" \
      "$bin" >"$dir/replica$i.log" 2>&1 &
    echo $! >"$dir/replica$i.pid"
  done
  for i in 1 2 3; do
    wait_for "http://127.0.0.1:$((port + 1000 + i))/readyz" "replica $i"
  done

  sed -e "s/127\.0\.0\.1:8081/127.0.0.1:$((port + 1))/" \
      -e "s/127\.0\.0\.1:8082/127.0.0.1:$((port + 2))/" \
      -e "s/127\.0\.0\.1:8083/127.0.0.1:$((port + 3))/" \
      -e "s/listen 127\.0\.0\.1:8080;/listen 127.0.0.1:$port;/" \
      -e "s#access_log /dev/stdout#access_log $dir/access.log#" \
      -e "s#alias /srv/sse-gateway/demo/;#alias $root/deploy/demo/;#" \
      "$root/deploy/nginx/sse-gateway.conf" >"$dir/sse-gateway.conf"
  cat >"$dir/nginx.conf" <<CONF
worker_processes 1;
error_log $dir/nginx-error.log;
pid $dir/nginx-master.pid;
events { worker_connections 4096; }
http {
    client_body_temp_path $dir/nginx-body;
    proxy_temp_path $dir/nginx-proxy;
    include $dir/sse-gateway.conf;
}
CONF
  nginx -p "$dir" -c "$dir/nginx.conf" -g 'daemon off;' >"$dir/nginx.log" 2>&1 &
  echo $! >"$dir/nginx.pid"
  for _ in $(seq 1 100); do
    code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/" || true)
    [ "$code" = "404" ] && break
    sleep 0.1
  done
  [ "$code" = "404" ] || { echo "run.sh: nginx did not come up; see $dir/nginx-error.log" >&2; exit 1; }

  token=$("$bin" token --sub demo --channel demo --ttl 24h)
  chat=$("$bin" token --sub "guest-$$" --channel 'room:*' --ttl 24h)
  poster=$("$bin" token --publish 'room:*' --ttl 24h)
  cat <<TXT
sse-gateway is running: nginx on http://127.0.0.1:$port, replicas on ports $((port + 1))-$((port + 3)),
admin ports $((port + 1001))-$((port + 1003)), Redis on $redis_port. State and logs: $dir

Watch it in a browser:
  http://127.0.0.1:$port/demo/#channel=demo&token=$token
A chat room with who is online (open it in two browsers, or add a second tab):
  http://127.0.0.1:$port/demo/chat.html#channel=room:lobby&token=$chat&publish=$poster
Stream (through nginx):
  curl -N -H 'Authorization: Bearer $token' 'http://127.0.0.1:$port/events?channel=demo'
Publish, fire-and-forget:
  redis-cli -p $redis_port PUBLISH sse:demo 'hello'
Publish, durable (resumable):
  redis-cli -p $redis_port FCALL sse_publish 1 '{sse:demo}' '{"event":"greeting","data":"hello"}'
Stop everything:
  $0 stop
TXT
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
