{{/*
A Grafana dashboard ConfigMap for Grafana's sidecar: call with (dict "root" $ "name" "training");
the JSON comes from dashboards/<name>.json.
*/}}
{{- define "fedcifar.dashboardConfigMap" -}}
{{- $root := .root -}}
{{- $file := printf "dashboards/%s.json" .name -}}
{{- $json := $root.Files.Get $file -}}
{{- if not $json }}
{{- fail (printf "the chart has no %s" $file) }}
{{- end }}
apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ printf "%s-dashboard-%s" (include "fedcifar.fullname" $root | trunc 40 | trimSuffix "-") .name | quote }}
  namespace: {{ default $root.Release.Namespace $root.Values.dashboards.namespace | quote }}
  labels:
    {{- include "fedcifar.componentLabels" (dict "root" $root "component" "dashboard") | nindent 4 }}
    {{ $root.Values.dashboards.label | quote }}: {{ $root.Values.dashboards.labelValue | quote }}
  {{- with $root.Values.dashboards.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
data:
  {{ printf "fedcifar-%s.json" .name }}: |-
    {{- $json | nindent 4 }}
{{- end }}
