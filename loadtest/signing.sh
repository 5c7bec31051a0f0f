#!/usr/bin/env bash
# What the token's algorithm costs a connect: churn against a replica verifying HS256 and one
# verifying RS256 (tests/fixtures' key pair), each on its own Redis, alternating; every connect a
# new token (a new user: nothing to remember) and returning users (the same token again: the
# verified-token cache answers).
#
#   loadtest/signing.sh                 # 3 rounds of 10 s each way
#   ROUNDS=5 SECS=20 loadtest/signing.sh
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
rounds=${ROUNDS:-3}
secs=${SECS:-10}
concurrency=${CONCURRENCY:-32}
port=${PORT:-18381}
secret=signing-bench-secret-0123456789ab
name=signing
# shellcheck source=loadtest/peers/lib.sh
. "$here/peers/lib.sh"

command -v redis-server >/dev/null || apt-get install -y -q redis-server >/dev/null
(cd "$root" && cargo build --release --workspace -q)
bin=$root/target/release/sse-gateway
tool=$root/target/release/sse-loadtest

start() { # n, key setting
  local n=$1
  shift
  start_redis $((port + 100 + n))
  env "$@" SSE_GATEWAY_REDIS_URL="redis://127.0.0.1:$((port + 100 + n))" \
    SSE_GATEWAY_LISTEN="127.0.0.1:$((port + n))" SSE_GATEWAY_ADMIN_LISTEN="127.0.0.1:$((port + 1000 + n))" \
    SSE_GATEWAY_LOG=warn "$bin" >"$dir/gateway$n.log" 2>&1 &
  pids+=($!)
  wait_for "http://127.0.0.1:$((port + 1000 + n))/readyz" -f
}
start 1 SSE_GATEWAY_JWT_SECRET="$secret"
start 2 SSE_GATEWAY_JWT_PUBLIC_KEY_FILE="$root/tests/fixtures/rsa_public.pem"

printf '| round | tokens | users | connects/s | connect p50 / p99 (ms) |\n|---|---|---|---|---|\n'
for round in $(seq 1 "$rounds"); do
  for alg in HS256 RS256; do
    for users in new returning; do
      args=(churn --concurrency "$concurrency" --secs "$secs" --json "$dir/churn.json")
      if [ "$alg" = HS256 ]; then
        args+=(--targets "127.0.0.1:$((port + 1))" --secret "$secret")
      else
        args+=(--targets "127.0.0.1:$((port + 2))" --private-key-file "$root/tests/fixtures/rsa_private.pem")
      fi
      [ "$users" = new ] || args+=(--returning-users)
      "$tool" "${args[@]}" >"$dir/churn.out" 2>&1 || { cat "$dir/churn.out" >&2; exit 1; }
      python3 - "$dir/churn.json" "$round" "$alg" "$users" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
c = r.get("connect_ms") or {}
print(f"| {sys.argv[2]} | {sys.argv[3]} | {sys.argv[4]} | {r.get('connects_per_sec', 0):,.0f} | {c.get('p50', 0):.2f} / {c.get('p99', 0):.2f} |")
PY
    done
  done
done
