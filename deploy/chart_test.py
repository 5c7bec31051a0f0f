#!/usr/bin/env python3
"""Render tests of the Helm chart: each renders the chart with some values and asserts what a
real cluster would be given. Run by deploy/check.sh (HELM names the helm binary)."""

import os
import subprocess
import sys

import yaml

HELM = os.environ.get("HELM", "helm")
CHART = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "helm", "sse-gateway")
failures = []


def render(*sets, files=(), kube_version=None):
    """The rendered objects, or the error text when helm refuses to render."""
    cmd = [HELM, "template", "t", CHART]
    for f in files:
        cmd += ["-f", os.path.join(CHART, "ci", f)]
    for s in sets:
        cmd += ["--set", s]
    if kube_version:
        cmd += ["--kube-version", kube_version]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def objects(rendered, kind):
    assert isinstance(rendered, list), f"did not render: {rendered}"
    return [o for o in rendered if o["kind"] == kind]


def one(rendered, kind, name=None):
    found = [o for o in objects(rendered, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"{len(found)} {kind} named {name}"
    return found[0]


def container(rendered):
    return one(rendered, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def env(rendered):
    return {e["name"]: e for e in container(rendered)["env"]}


def refuses(rendered, why):
    assert isinstance(rendered, str), "rendered, but must refuse"
    assert why in rendered, f"refused for another reason: {rendered}"


def test(fn):
    try:
        fn()
        print(f"ok   {fn.__name__}")
    except AssertionError as e:
        failures.append(fn.__name__)
        print(f"FAIL {fn.__name__}: {e}")
    return fn


@test
def defaults_install_as_is_with_a_bundled_persistent_redis_and_generated_keys():
    r = render()
    secret = one(r, "Secret")["stringData"]
    assert len(secret["jwt-secret"]) >= 32 and len(secret["admin-token"]) >= 32
    assert secret["redis-url"] == "redis://t-sse-gateway-redis:6379"
    sts = one(r, "StatefulSet", "t-sse-gateway-redis")
    args = sts["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--appendonly") + 1] == "yes", args
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    e = env(r)
    assert e["SSE_GATEWAY_JWT_SECRET"]["valueFrom"]["secretKeyRef"]["key"] == "jwt-secret"
    assert e["SSE_GATEWAY_REDIS_URL"]["valueFrom"]["secretKeyRef"]["key"] == "redis-url"


@test
def an_external_redis_turns_the_bundled_one_off():
    for r in (render("redis.url=redis://r:6379"), render("redis.existingSecret=x")):
        assert not objects(r, "StatefulSet")
    assert one(render("redis.url=redis://r:6379"), "Secret")["stringData"]["redis-url"] == "redis://r:6379"
    e = env(render("redis.existingSecret=mine", "redis.existingSecretKey=url"))
    assert e["SSE_GATEWAY_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "mine", "key": "url"}


@test
def each_pod_advertises_its_own_ip_for_inspect():
    e = env(render())
    assert e["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert e["SSE_GATEWAY_ADMIN_ADVERTISE"]["value"] == "$(POD_IP):9090"


@test
def a_public_key_is_mounted_as_a_file_instead_of_a_secret():
    r = render(files=["gateway-api-keda-values.yaml"])
    e = env(r)
    assert "SSE_GATEWAY_JWT_SECRET" not in e
    assert e["SSE_GATEWAY_JWT_PUBLIC_KEY_FILE"]["value"] == "/etc/sse-gateway/jwt/public.pem"
    assert "BEGIN PUBLIC KEY" in one(r, "Secret")["stringData"]["public.pem"]
    mounts = {m["name"]: m["mountPath"] for m in container(r)["volumeMounts"]}
    assert mounts["jwt"] == "/etc/sse-gateway/jwt"


@test
def two_key_sources_refuse_to_render():
    refuses(render("jwt.secret=s", "jwt.publicKeySecret=k"), "choose one of")
    refuses(render("jwt.jwksUrl=https://idp/jwks.json", "jwt.secret=s"), "choose one of")


@test
def a_jwks_url_replaces_the_generated_key():
    r = render("jwt.jwksUrl=https://idp.example.com/.well-known/jwks.json")
    e = env(r)
    assert e["SSE_GATEWAY_JWT_JWKS_URL"]["value"] == "https://idp.example.com/.well-known/jwks.json"
    assert "SSE_GATEWAY_JWT_SECRET" not in e
    assert "jwt-secret" not in one(r, "Secret")["stringData"]


@test
def tls_and_a_private_redis_ca_and_a_redis_password_come_from_secrets():
    r = render(files=["full-values.yaml"])
    e = env(r)
    assert e["SSE_GATEWAY_TLS_CERT_FILE"]["value"] == "/etc/sse-gateway/tls/tls.crt"
    assert e["SSL_CERT_FILE"]["value"] == "/etc/sse-gateway/redis-ca/ca.crt"
    names = [x["name"] for x in container(r)["env"]]
    assert names.index("REDIS_PASSWORD") < names.index("SSE_GATEWAY_REDIS_URL")
    assert e["SSE_GATEWAY_REDIS_URL"]["value"].startswith("rediss+sentinel://:$(REDIS_PASSWORD)@")
    # Every secret comes from the cluster's own Secrets: the chart writes none.
    assert not objects(r, "Secret")
    mounts = {m["name"] for m in container(r)["volumeMounts"]}
    assert {"tls", "redis-ca", "jwt", "scratch"} <= mounts, mounts
    assert e["SSE_GATEWAY_LOG"]["value"] == "info,sse_gateway=debug"


@test
def the_ingress_names_no_balancing_method_ingress_nginx_ignores():
    ing = one(render("ingress.enabled=true"), "Ingress")
    assert not any("load-balance" in k for k in ing["metadata"]["annotations"]), ing


@test
def streams_are_rebalanced_when_an_autoscaler_is_on():
    assert env(render())["SSE_GATEWAY_MAX_STREAM_SECS"]["value"] == "0"
    assert env(render("autoscaling.enabled=true"))["SSE_GATEWAY_MAX_STREAM_SECS"]["value"] == "3600"
    r = render(files=["gateway-api-keda-values.yaml"])
    assert env(r)["SSE_GATEWAY_MAX_STREAM_SECS"]["value"] == "3600"
    assert env(render("maxStreamSeconds=900"))["SSE_GATEWAY_MAX_STREAM_SECS"]["value"] == "900"


@test
def rollouts_wait_for_trusted_pods_and_probes_can_be_overridden():
    r = render()
    assert one(r, "Deployment")["spec"]["minReadySeconds"] >= 5
    probe = container(r)["readinessProbe"]
    assert 2 <= probe["timeoutSeconds"] <= 3 and 2 <= probe["failureThreshold"] <= 3, probe
    probe = container(render("readinessProbe.periodSeconds=7"))["readinessProbe"]
    assert probe["periodSeconds"] == 7


@test
def keda_needs_the_service_monitor_and_never_scales_to_zero():
    refuses(render("keda.enabled=true"), "needs serviceMonitor.enabled")
    refuses(render("keda.enabled=true", "serviceMonitor.enabled=true", "autoscaling.enabled=true"),
            "enable one")
    refuses(render("keda.enabled=true", "serviceMonitor.enabled=true", "keda.minReplicas=0"),
            "minReplicas")
    so = one(render(files=["gateway-api-keda-values.yaml"]), "ScaledObject")["spec"]
    assert so["fallback"]["replicas"] >= 1
    assert so["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    trigger = so["triggers"][0]["metadata"]
    assert trigger["ignoreNullValues"] == "false"
    assert 'service="t-sse-gateway-admin"' in trigger["query"], trigger


@test
def the_admin_port_is_on_its_own_service_and_closed_by_default():
    r = render()
    public = one(r, "Service", "t-sse-gateway")
    assert [p["name"] for p in public["spec"]["ports"]] == ["client"]
    admin = one(r, "Service", "t-sse-gateway-admin")
    assert admin["spec"]["type"] == "ClusterIP"
    policy = one(r, "NetworkPolicy", "t-sse-gateway")["spec"]["ingress"]
    admin_rule = [rule for rule in policy if rule["ports"][0]["port"] == "admin"][0]
    sources = admin_rule["from"]
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}} in sources
    # No source that matches every namespace or every pod.
    assert all(v for s in sources for v in s.values()), sources
    closed = one(render("networkPolicy.metricsNamespace="), "NetworkPolicy", "t-sse-gateway")
    rule = [x for x in closed["spec"]["ingress"] if x["ports"][0]["port"] == "admin"][0]
    assert [list(s) for s in rule["from"]] == [["podSelector"]], rule
    pod = one(r, "Deployment")["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False and pod["enableServiceLinks"] is False
    assert env(r)["SSE_GATEWAY_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "admin-token"
    sm = one(render("serviceMonitor.enabled=true"), "ServiceMonitor")["spec"]["selector"]["matchLabels"]
    assert sm.get("sse-gateway/port") == "admin"
    assert all(admin["metadata"]["labels"].get(k) == v for k, v in sm.items()), (sm, admin["metadata"]["labels"])


@test
def httproute_timeouts_are_rendered_only_when_asked():
    base = ["httpRoute.enabled=true", "httpRoute.parentRefs[0].name=gw"]
    rule = one(render(*base), "HTTPRoute")["spec"]["rules"][0]
    assert "timeouts" not in rule
    rule = one(render(*base, "httpRoute.timeouts.request=0s"), "HTTPRoute")["spec"]["rules"][0]
    assert rule["timeouts"] == {"request": "0s"}


@test
def clusters_older_than_the_sleep_prestop_hook_are_refused():
    refuses(render(kube_version="1.29.0"), "kubeVersion")
    assert isinstance(render(kube_version="1.30.0"), list)


@test
def alerts_divide_by_the_exported_capacity_and_ignore_rollout_draining():
    rules = one(render(files=["full-values.yaml"]), "PrometheusRule")["spec"]["groups"][0]["rules"]
    by = {r["alert"]: r for r in rules}
    assert "sse_gateway_max_connections" in by["SseGatewayNearCapacity"]["expr"]
    assert "draining" not in by["SseGatewayRejectedConnections"]["expr"]
    for name in ["SseGatewayDown", "SseGatewayFileDescriptors", "SseGatewayPublishErrors",
                 "SseGatewayDeliveryLatencyHigh", "SseGatewayClientsFlapping"]:
        assert name in by, name
    readme = open(os.path.join(CHART, "README.md")).read()
    for name in by:
        assert f"### {name}" in readme, f"no runbook section for {name} in the chart README"


if failures:
    print(f"{len(failures)} chart test(s) failed: {', '.join(failures)}")
    sys.exit(1)
print("chart tests passed")
