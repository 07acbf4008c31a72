{{/*
Expand the name of the chart.
*/}}
{{- define "fedcifar.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Create a default fully qualified app name.
We truncate at 63 chars because some Kubernetes name fields are limited to this (by the DNS naming spec).
If release name contains chart name it will be used as a full name.
*/}}
{{- define "fedcifar.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Create chart name and version as used by the chart label.
*/}}
{{- define "fedcifar.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels
*/}}
{{- define "fedcifar.labels" -}}
helm.sh/chart: {{ include "fedcifar.chart" . }}
{{ include "fedcifar.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: {{ include "fedcifar.name" . }}
{{- end }}

{{/*
Selector labels
*/}}
{{- define "fedcifar.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fedcifar.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Component labels and selector labels: call with (dict "root" $ "component" "superlink").
*/}}
{{- define "fedcifar.componentLabels" -}}
{{ include "fedcifar.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "fedcifar.componentSelectorLabels" -}}
{{ include "fedcifar.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
Object names. The StatefulSet name stays within 52 characters, because the controller adds
"-<10 character hash>" to it in the controller-revision-hash label (at most 63 characters).
*/}}
{{- define "fedcifar.superlink.fullname" -}}
{{- printf "%s-superlink" (include "fedcifar.fullname" . | trunc 53 | trimSuffix "-") }}
{{- end }}

{{- define "fedcifar.clients.fullname" -}}
{{- printf "%s-clients" (include "fedcifar.fullname" . | trunc 44 | trimSuffix "-") }}
{{- end }}

{{- define "fedcifar.env.fullname" -}}
{{- printf "%s-env" (include "fedcifar.fullname" . | trunc 59 | trimSuffix "-") }}
{{- end }}

{{/* The Job name carries the release revision: Jobs are immutable, so each upgrade submits a new run. */}}
{{- define "fedcifar.run.fullname" -}}
{{- printf "%s-run-%d" (include "fedcifar.fullname" . | trunc 50 | trimSuffix "-") (int .Release.Revision) }}
{{- end }}

{{- define "fedcifar.superlink.pvcName" -}}
{{- if .Values.superlink.persistence.existingClaim }}
{{- .Values.superlink.persistence.existingClaim }}
{{- else }}
{{- include "fedcifar.superlink.fullname" . }}
{{- end }}
{{- end }}

{{/*
The name of the ServiceAccount the pods use.
*/}}
{{- define "fedcifar.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "fedcifar.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The SuperLink address (in-namespace Service name and port) and its health URL.
*/}}
{{- define "fedcifar.superlink.address" -}}
{{- printf "%s:%d" (include "fedcifar.superlink.fullname" .) (int .Values.superlink.port) }}
{{- end }}

{{- define "fedcifar.superlink.healthURL" -}}
{{- printf "http://%s/health" (include "fedcifar.superlink.address" .) }}
{{- end }}

{{/*
Images: the CPU image everywhere, the CUDA image for the clients when clients.gpu.enabled.
*/}}
{{- define "fedcifar.image" -}}
{{- printf "%s:%s" .Values.image.repository .Values.image.tag }}
{{- end }}

{{- define "fedcifar.clients.image" -}}
{{- if .Values.clients.gpu.enabled }}
{{- printf "%s:%s" (default .Values.image.repository .Values.clients.gpu.image.repository) .Values.clients.gpu.image.tag }}
{{- else }}
{{- include "fedcifar.image" . }}
{{- end }}
{{- end }}

{{/*
Fixed paths inside the pods (the image runs with a read-only root filesystem).
*/}}
{{- define "fedcifar.runDir" -}}/var/run/fedcifar{{- end }}
{{- define "fedcifar.metricsDir" -}}/var/run/fedcifar/metrics{{- end }}
{{- define "fedcifar.flwrHome" -}}/var/run/fedcifar/flwr{{- end }}
{{- define "fedcifar.cacheDir" -}}/var/cache/fedcifar{{- end }}
{{- define "fedcifar.stateDir" -}}/var/lib/fedcifar{{- end }}

{{/*
Prometheus scrape annotations for a pod template.
*/}}
{{- define "fedcifar.scrapeAnnotations" -}}
{{- if .Values.metrics.scrapeAnnotations -}}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .Values.metrics.port | int | toString | quote }}
prometheus.io/path: "/metrics"
{{- end }}
{{- end }}

{{/*
Rolls pods when the environment ConfigMap they read changes.
*/}}
{{- define "fedcifar.configChecksum" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap-env.yaml") . | sha256sum }}
{{- end }}

{{/*
A TOML float: Go prints 1.0 as "1", TOML wants "1.0".
*/}}
{{- define "fedcifar.tomlFloat" -}}
{{- $s := toString (float64 .) -}}
{{- if or (contains "." $s) (contains "e" $s) (contains "Inf" $s) (contains "NaN" $s) -}}
{{- $s -}}
{{- else -}}
{{- printf "%s.0" $s -}}
{{- end -}}
{{- end }}

{{/*
A TOML value for run.extraConfig: strings quoted, booleans bare, whole numbers as integers.
*/}}
{{- define "fedcifar.tomlValue" -}}
{{- if kindIs "string" . -}}
{{- toJson . -}}
{{- else if kindIs "bool" . -}}
{{- toString . -}}
{{- else if or (kindIs "float64" .) (kindIs "float32" .) -}}
{{- if eq (float64 .) (float64 (int64 .)) -}}
{{- int64 . -}}
{{- else -}}
{{- include "fedcifar.tomlFloat" . -}}
{{- end -}}
{{- else -}}
{{- toString . -}}
{{- end -}}
{{- end }}

{{/*
The Flower run config passed to `flwr run --run-config`.
*/}}
{{- define "fedcifar.runConfig" -}}
{{- $run := .Values.run -}}
{{- $minNodes := .Values.clients.replicas -}}
{{- if not (kindIs "invalid" $run.minNodes) }}{{ $minNodes = $run.minNodes }}{{ end -}}
{{- $pairs := list
  (printf "num-server-rounds=%d" (int $run.rounds))
  (printf "local-epochs=%d" (int $run.localEpochs))
  (printf "batch-size=%d" (int $run.batchSize))
  (printf "learning-rate=%s" (include "fedcifar.tomlFloat" $run.learningRate))
  (printf "momentum=%s" (include "fedcifar.tomlFloat" $run.momentum))
  (printf "partitioner=%s" (toJson $run.partitioner))
  (printf "dirichlet-alpha=%s" (include "fedcifar.tomlFloat" $run.dirichletAlpha))
  (printf "fraction-train=%s" (include "fedcifar.tomlFloat" $run.fractionTrain))
  (printf "fraction-evaluate=%s" (include "fedcifar.tomlFloat" $run.fractionEvaluate))
  (printf "min-nodes=%d" (int $minNodes))
  (printf "num-partitions=%d" (int .Values.clients.replicas))
  (printf "round-timeout=%s" (include "fedcifar.tomlFloat" $run.roundTimeout))
  (printf "seed=%d" (int $run.seed))
  (printf "device=%s" (toJson $run.device))
-}}
{{- range $key := keys $run.extraConfig | sortAlpha }}
{{- $pairs = append $pairs (printf "%s=%s" $key (include "fedcifar.tomlValue" (get $run.extraConfig $key))) }}
{{- end }}
{{- join " " $pairs }}
{{- end }}

{{/*
Checks on values that the schema cannot express. Included by the SuperLink Deployment, which
every release renders.
*/}}
{{- define "fedcifar.validate" -}}
{{- if lt (int .Values.clients.replicas) 1 }}
{{- fail (printf "clients.replicas must be at least 1, got %v." .Values.clients.replicas) }}
{{- end }}
{{- if eq .Values.data.source "volume" }}
{{- if and (not .Values.data.volume.existingClaim) (not .Values.data.volume.hostPath) }}
{{- fail "data.source is \"volume\" but neither data.volume.existingClaim nor data.volume.hostPath is set: set one of them, or use data.source=hub." }}
{{- end }}
{{- if and .Values.data.volume.existingClaim .Values.data.volume.hostPath }}
{{- fail "data.volume.existingClaim and data.volume.hostPath are both set: choose one of them." }}
{{- end }}
{{- end }}
{{- if and .Values.superlink.persistence.existingClaim (not .Values.superlink.persistence.enabled) }}
{{- fail "superlink.persistence.existingClaim is set but superlink.persistence.enabled is false: enable persistence to use the claim." }}
{{- end }}
{{- if not (kindIs "invalid" .Values.run.minNodes) }}
{{- if gt (int .Values.run.minNodes) (int .Values.clients.replicas) }}
{{- fail (printf "run.minNodes (%v) is larger than clients.replicas (%v): the run would wait forever for clients that do not exist." .Values.run.minNodes .Values.clients.replicas) }}
{{- end }}
{{- end }}
{{- $builtin := list "num-server-rounds" "local-epochs" "batch-size" "learning-rate" "momentum" "partitioner" "dirichlet-alpha" "fraction-train" "fraction-evaluate" "min-nodes" "num-partitions" "round-timeout" "seed" "device" }}
{{- range $key, $_ := .Values.run.extraConfig }}
{{- if has $key $builtin }}
{{- fail (printf "run.extraConfig.%s repeats a run-config key that the chart sets from run.*: set the matching camelCase value under run instead." $key) }}
{{- end }}
{{- end }}
{{- range $key := list "learningRate" "dirichletAlpha" "roundTimeout" "fractionTrain" }}
{{- if le (float64 (get $.Values.run $key)) 0.0 }}
{{- fail (printf "run.%s must be greater than 0, got %v." $key (get $.Values.run $key)) }}
{{- end }}
{{- end }}
{{- range $key := list "fractionTrain" "fractionEvaluate" }}
{{- $v := float64 (get $.Values.run $key) }}
{{- if or (lt $v 0.0) (gt $v 1.0) }}
{{- fail (printf "run.%s is a fraction of the clients and must lie between 0 and 1, got %v." $key (get $.Values.run $key)) }}
{{- end }}
{{- end }}
{{- if lt (float64 .Values.run.momentum) 0.0 }}
{{- fail (printf "run.momentum must not be negative, got %v." .Values.run.momentum) }}
{{- end }}
{{- if or (eq .Values.image.tag "latest") (eq .Values.clients.gpu.image.tag "latest") }}
{{- fail "image.tag and clients.gpu.image.tag must be fixed versions, not \"latest\"." }}
{{- end }}
{{- if and .Values.clients.gpu.enabled (lt (int .Values.clients.gpu.count) 1) }}
{{- fail "clients.gpu.enabled is true but clients.gpu.count is below 1: request at least one GPU per client." }}
{{- end }}
{{- end }}

{{/*
Writable emptyDirs every fedcifar pod mounts: /tmp, the run folder (metrics, FLWR_HOME) and caches.
*/}}
{{- define "fedcifar.commonVolumes" -}}
- name: tmp
  emptyDir: {}
- name: run
  emptyDir: {}
- name: cache
  emptyDir: {}
{{- end }}

{{- define "fedcifar.commonVolumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: run
  mountPath: {{ include "fedcifar.runDir" . }}
- name: cache
  mountPath: {{ include "fedcifar.cacheDir" . }}
{{- end }}

{{/*
The read-only data volume (data.source=volume).
*/}}
{{- define "fedcifar.dataVolume" -}}
- name: data
  {{- if .Values.data.volume.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ .Values.data.volume.existingClaim }}
    readOnly: true
  {{- else }}
  hostPath:
    path: {{ .Values.data.volume.hostPath }}
    type: Directory
  {{- end }}
{{- end }}

{{- define "fedcifar.dataVolumeMount" -}}
- name: data
  mountPath: {{ .Values.data.mountPath }}
  readOnly: true
  {{- with .Values.data.volume.subPath }}
  subPath: {{ . }}
  {{- end }}
{{- end }}

{{/*
A map of NAME: value as a container env list.
*/}}
{{- define "fedcifar.envList" -}}
{{- range $name := keys . | sortAlpha }}
- name: {{ $name }}
  value: {{ get $ $name | toString | quote }}
{{- end }}
{{- end }}

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
  name: {{ printf "%s-dashboard-%s" (include "fedcifar.fullname" $root | trunc 40 | trimSuffix "-") .name }}
  namespace: {{ default $root.Release.Namespace $root.Values.dashboards.namespace }}
  labels:
    {{- include "fedcifar.componentLabels" (dict "root" $root "component" "dashboard") | nindent 4 }}
    {{ $root.Values.dashboards.label }}: {{ $root.Values.dashboards.labelValue | quote }}
  {{- with $root.Values.dashboards.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
data:
  {{ printf "fedcifar-%s.json" .name }}: |-
    {{- $json | nindent 4 }}
{{- end }}
