{{- define "sse-gateway.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "sse-gateway.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "sse-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end -}}

{{- define "sse-gateway.redisSelectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: redis
{{- end -}}

{{/* The chart's own Secret: generated keys and what values put in it. */}}
{{- define "sse-gateway.secretName" -}}
{{- include "sse-gateway.fullname" . -}}
{{- end -}}

{{/* Whether the bundled Redis runs: on, unless an external one is named. */}}
{{- define "sse-gateway.bundledRedis" -}}
{{- if and .Values.redis.bundled.enabled (not .Values.redis.url) (not .Values.redis.existingSecret) -}}
true
{{- end -}}
{{- end -}}

{{- define "sse-gateway.redisHost" -}}
{{- printf "%s-redis" (include "sse-gateway.fullname" .) -}}
{{- end -}}

{{/* Which key verification the values ask for: secret, publicKey or jwks. */}}
{{- define "sse-gateway.jwtMode" -}}
{{- $modes := list -}}
{{- if or .Values.jwt.publicKey .Values.jwt.publicKeySecret -}}{{- $modes = append $modes "publicKey" -}}{{- end -}}
{{- if .Values.jwt.jwksUrl -}}{{- $modes = append $modes "jwks" -}}{{- end -}}
{{- if or .Values.jwt.secret .Values.jwt.existingSecret -}}{{- $modes = append $modes "secret" -}}{{- end -}}
{{- if gt (len $modes) 1 -}}
{{- fail (printf "jwt: choose one of jwt.secret/jwt.existingSecret, jwt.publicKey/jwt.publicKeySecret and jwt.jwksUrl (got %s)" (join ", " $modes)) -}}
{{- end -}}
{{- if $modes -}}{{- first $modes -}}{{- else -}}secret{{- end -}}
{{- end -}}

{{/*
A generated value kept across upgrades: the one already in the chart's Secret (lookup), or a new
random one on first install. `helm template` cannot look up and renders a fresh one each time.
*/}}
{{- define "sse-gateway.kept" -}}
{{- $root := index . 0 -}}
{{- $key := index . 1 -}}
{{- $existing := lookup "v1" "Secret" $root.Release.Namespace (include "sse-gateway.secretName" $root) -}}
{{- if and $existing (index ($existing.data | default dict) $key) -}}
{{- index $existing.data $key | b64dec -}}
{{- else -}}
{{- randAlphaNum 48 -}}
{{- end -}}
{{- end -}}

{{/* Streams close after about this long: the value, or an hour when an autoscaler is on. */}}
{{- define "sse-gateway.maxStreamSeconds" -}}
{{- if gt (int .Values.maxStreamSeconds) 0 -}}
{{- .Values.maxStreamSeconds -}}
{{- else if or .Values.autoscaling.enabled .Values.keda.enabled -}}
3600
{{- else -}}
0
{{- end -}}
{{- end -}}

{{/* Refusals of combinations that would fail quietly on a cluster. */}}
{{- define "sse-gateway.validate" -}}
{{- if and .Values.autoscaling.enabled .Values.keda.enabled -}}
{{- fail "autoscaling.enabled and keda.enabled both manage the replica count; enable one" -}}
{{- end -}}
{{- if and .Values.keda.enabled (not .Values.serviceMonitor.enabled) -}}
{{- fail "keda.enabled needs serviceMonitor.enabled: without the ServiceMonitor Prometheus has no sse_gateway_connections, KEDA's query returns nothing and the deployment shrinks to keda.minReplicas" -}}
{{- end -}}
{{- if and .Values.keda.enabled (lt (int .Values.keda.minReplicas) 1) -}}
{{- fail "keda.minReplicas must be at least 1: with 0 replicas no stream can be opened to scale up on" -}}
{{- end -}}
{{- if and .Values.redis.passwordSecret (not .Values.redis.url) -}}
{{- fail "redis.passwordSecret needs redis.url (without the password), e.g. redis://redis-master.data:6379" -}}
{{- end -}}
{{- if and (eq (include "sse-gateway.jwtMode" .) "jwks") (not (hasPrefix "https://" .Values.jwt.jwksUrl)) -}}
{{- fail "jwt.jwksUrl must be an https:// URL" -}}
{{- end -}}
{{- end -}}

{{/* An alert's runbook: a section of the chart README (its anchor is the alert's name). */}}
{{- define "sse-gateway.runbook" -}}
{{- $root := index . 0 -}}
{{- $anchor := index . 1 -}}
{{- if $root.Values.prometheusRule.runbookBaseUrl -}}
runbook_url: {{ printf "%s#%s" $root.Values.prometheusRule.runbookBaseUrl (lower $anchor) | quote }}
{{- else -}}
runbook: {{ printf "sse-gateway chart README, section %s" $anchor | quote }}
{{- end -}}
{{- end -}}
