{{/*
The SuperLink pod's own pieces: the annotations that roll it and its probes' health check.
*/}}

{{/* Annotations that roll the SuperLink pod when its proxy config or its certificate's names change. */}}
{{- define "fedcifar.superlink.podAnnotations" -}}
checksum/proxy: {{ include (print .Template.BasePath "/superlink-proxy-configmap.yaml") . | sha256sum }}
# the certificate is read at start: new names (a new certificate, same CA) roll the pod
checksum/tls-names: {{ print (include "fedcifar.tls.dnsNames" .) (include "fedcifar.tls.ipAddresses" .) | sha256sum }}
# `kubectl logs/exec deploy/<superlink>` without -c (kubectl 1.21 and newer)
kubectl.kubernetes.io/default-container: superlink
{{- end }}

{{/* The SuperLink container's probes ask Flower itself on the loopback (not through the proxy): an exec command, a JSON list. */}}
{{- define "fedcifar.superlink.localHealthCommand" -}}
{{- $url := printf "%s://127.0.0.1:%d/health" (ternary "https" "http" .Values.tls.enabled) (int .Values.superlink.controlPort) -}}
{{- $context := ternary (printf "ssl.create_default_context(cafile=%s)" (include "fedcifar.tls.caFile" . | quote)) "None" .Values.tls.enabled -}}
{{- list "python3" "-c" (printf "import ssl, urllib.request; urllib.request.urlopen(%s, timeout=4, context=%s)" ($url | quote) $context) | toJson -}}
{{- end }}

{{/* The tracking URI the ServerApp logs to: the release's own MLflow server, or tracking.mlflow.uri. */}}
{{- define "fedcifar.mlflow.uri" -}}
{{- if .Values.tracking.mlflow.server.enabled -}}
{{- printf "http://127.0.0.1:%d" (int .Values.tracking.mlflow.server.port) -}}
{{- else -}}
{{- .Values.tracking.mlflow.uri -}}
{{- end -}}
{{- end }}

{{/* The MLflow server's health check from inside the pod (it listens on the loopback alone). */}}
{{- define "fedcifar.mlflow.healthCommand" -}}
{{- $url := printf "http://127.0.0.1:%d/health" (int .Values.tracking.mlflow.server.port) -}}
{{- list "python3" "-c" (printf "import urllib.request; urllib.request.urlopen(%s, timeout=4)" ($url | quote)) | toJson -}}
{{- end }}
