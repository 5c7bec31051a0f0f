#!/usr/bin/env bash
# Side-by-side run: sse-gateway, Nchan (with its Redis backend, one worker) and the Python stack
# (FastAPI + sse-starlette + redis.asyncio, one uvicorn process), each on its own Redis, all on
# loopback, measured by the same load tool in one run.
#
#   loadtest/peers/compare.sh                 # every scenario, 10,000 streams
#   STREAMS=2000 SYSTEMS="sse-gateway nchan" loadtest/peers/compare.sh
#
# Settings (environment):
#   STREAMS     streams for idle and broadcast (default 10000)
#   SYSTEMS     which systems (default "sse-gateway nchan python")
#   SCENARIOS   which scenarios (default "idle broadcast light private churn")
#   OUT         reports: <scenario>-<system>.json/.html and table.md (default target/compare)
#   GATEWAY_THREADS  worker threads of the gateway (TOKIO_WORKER_THREADS; default: all cores)
#
# Installs what it needs when missing: nginx-light and libnginx-mod-nchan (apt), a Python venv
# with peers/python/requirements.txt (pip) under ~/.cache/sse-gateway/peers-venv.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
streams=${STREAMS:-10000}
systems=${SYSTEMS:-sse-gateway nchan python}
scenarios=${SCENARIOS:-idle broadcast light private churn}
out=${OUT:-$root/target/compare}
secret=compare-secret-0123456789abcdef
export SSE_GATEWAY_JWT_SECRET=$secret
mkdir -p "$out"
name=compare
# shellcheck source=loadtest/peers/lib.sh
. "$here/lib.sh"


need_apt=()
[ -e /usr/lib/nginx/modules/ngx_nchan_module.so ] || need_apt+=(nginx-light libnginx-mod-nchan)
command -v redis-server >/dev/null || need_apt+=(redis-server)
command -v curl >/dev/null || need_apt+=(curl)
if [ ${#need_apt[@]} -gt 0 ]; then
  apt-get install -y -q "${need_apt[@]}" >/dev/null
fi
venv=${HOME}/.cache/sse-gateway/peers-venv
if [ ! -x "$venv/bin/uvicorn" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q -r "$here/python/requirements.txt"
fi
(cd "$root" && cargo build --release --workspace -q)
tool=$root/target/release/sse-loadtest


# Each system gets its own Redis, so one's leftovers cannot load another.
declare -A port redis pidlist
for s in $systems; do
  port[$s]=$(free_port)
  redis[$s]=$(free_port)
  start_redis "${redis[$s]}"
done
sleep 0.3

for s in $systems; do
  case $s in
    sse-gateway)
      admin=$(free_port)
      env TOKIO_WORKER_THREADS="${GATEWAY_THREADS:-$(nproc)}" SSE_GATEWAY_LOG=warn \
        SSE_GATEWAY_REDIS_URL="redis://127.0.0.1:${redis[$s]}" \
        SSE_GATEWAY_LISTEN="127.0.0.1:${port[$s]}" SSE_GATEWAY_ADMIN_LISTEN="127.0.0.1:$admin" \
        "$root/target/release/sse-gateway" 2>"$dir/gateway.log" &
      pids+=($!)
      pidlist[$s]=$!
      wait_for "http://127.0.0.1:$admin/readyz"
      ;;
    nchan)
      mkdir -p "$dir/nchan"
      sed -e "s|@DIR@|$dir/nchan|g" -e "s|@PORT@|${port[$s]}|g" \
        -e "s|@REDIS@|redis://127.0.0.1:${redis[$s]}|g" "$here/nchan.conf.template" >"$dir/nchan/nginx.conf"
      nginx -c "$dir/nchan/nginx.conf" -p "$dir/nchan" -e "$dir/nchan/error.log" &
      pids+=($!)
      wait_for "http://127.0.0.1:${port[$s]}/pub?channel=probe"
      # Master and worker: the worker does the work, both hold memory.
      pidlist[$s]="$(cat "$dir/nchan/nginx.pid"),$(pgrep -P "$(cat "$dir/nchan/nginx.pid")" | paste -sd,)"
      ;;
    python)
      (cd "$here/python" && REDIS_URL="redis://127.0.0.1:${redis[$s]}" \
        exec "$venv/bin/uvicorn" app:app --host 127.0.0.1 --port "${port[$s]}" \
        --log-level warning --no-access-log --backlog 4096 2>"$dir/python.log") &
      pids+=($!)
      pidlist[$s]=$!
      wait_for "http://127.0.0.1:${port[$s]}/docs"
      ;;
    *) echo "compare.sh: unknown system $s" >&2; exit 2 ;;
  esac
done

cpu_ticks() { # comma-separated pids -> their CPU ticks together (0 for a process that is gone)
  local sum=0 p
  for p in ${1//,/ }; do
    sum=$((sum + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0)))
  done
  echo "$sum"
}

settle() { # wait (up to 30 s) until the system under test uses under 5% of a core
  local before after
  for _ in $(seq 1 30); do
    before=$(cpu_ticks "$1")
    sleep 1
    after=$(cpu_ticks "$1")
    [ $((after - before)) -le 5 ] && return 0
  done
}

run() { # system scenario tool-args...
  local s=$1 name=$2 p
  shift 2
  for p in ${pidlist[$s]//,/ }; do
    if ! kill -0 "$p" 2>/dev/null; then
      echo "compare.sh: $s (PID $p) is gone; skipping $name on it (logs kept in $out/logs)" >&2
      mkdir -p "$out/logs"
      cp -r "$dir"/. "$out/logs/" 2>/dev/null || true
      return 0
    fi
  done
  settle "${pidlist[$s]}"
  echo "== $name on $s" >&2
  # A channel per run: a system still working off one run's backlog cannot leak into the next.
  "$tool" "$@" --targets "127.0.0.1:${port[$s]}" --pids "${pidlist[$s]}" --label "$s" \
    --channel "load-$name" --json "$out/$name-$s.json" --html "$out/$name-$s.html" ||
    echo "($name on $s reported a shortfall)" >&2
}

for s in $systems; do
  case $s in
    nchan) pub=(--via nchan) ;;
    *) pub=(--via redis --redis-url "redis://127.0.0.1:${redis[$s]}") ;;
  esac
  for scenario in $scenarios; do
    case $scenario in
      idle) run "$s" idle idle --streams "$streams" --hold-secs 5 ;;
      broadcast) run "$s" broadcast broadcast "${pub[@]}" --streams "$streams" --events 200 --rate 20 ;;
      light) run "$s" light broadcast --name light "${pub[@]}" --streams "$streams" --events 40 --rate 2 ;;
      private) run "$s" private private "${pub[@]}" --streams 2000 --events 20000 --rate 2000 ;;
      churn) run "$s" churn churn --concurrency 64 --secs 10 ;;
      *) echo "compare.sh: unknown scenario $scenario" >&2; exit 2 ;;
    esac
  done
done

reports=()
for scenario in $scenarios; do
  for s in $systems; do
    f="$out/$scenario-$s.json"
    [ -e "$f" ] && reports+=("$f")
  done
done
"$tool" table "${reports[@]}" | tee "$out/table.md"
echo "reports: $out" >&2
