{{/*
Labels: the app.kubernetes.io/* set every object carries, the selector subset (name and instance
only, which never changes) and a component's.
*/}}

{{/* Every object's labels. */}}
{{- define "fedcifar.labels" -}}
helm.sh/chart: {{ include "fedcifar.chart" . | quote }}
{{ include "fedcifar.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service | quote }}
app.kubernetes.io/part-of: {{ include "fedcifar.name" . | quote }}
{{- end }}

{{/* The labels that select this release's objects. */}}
{{- define "fedcifar.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fedcifar.name" . | quote }}
app.kubernetes.io/instance: {{ .Release.Name | quote }}
{{- end }}

{{/* A component's labels: call with (dict "root" $ "component" "superlink"). */}}
{{- define "fedcifar.componentLabels" -}}
{{ include "fedcifar.labels" .root }}
app.kubernetes.io/component: {{ .component | quote }}
{{- end }}

{{/* The labels that select a component's pods: call with (dict "root" $ "component" "superlink"). */}}
{{- define "fedcifar.componentSelectorLabels" -}}
{{ include "fedcifar.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component | quote }}
{{- end }}

{{/* A label map as a Kubernetes label selector string: k1=v1,k2=v2 (sorted). */}}
{{- define "fedcifar.selectorString" -}}
{{- $pairs := list }}
{{- range $k := keys . | sortAlpha }}
{{- $pairs = append $pairs (printf "%s=%s" $k (get $ $k)) }}
{{- end }}
{{- join "," $pairs }}
{{- end }}
