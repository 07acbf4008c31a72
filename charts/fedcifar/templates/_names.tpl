{{/*
Names: the chart's, the release's (fullname) and every object's. Each stays within 63 characters
(the DNS label limit); the clients' StatefulSet within 52, because the controller adds
"-<10 character hash>" to it in the controller-revision-hash label.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "fedcifar.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The release's full name, prefix of every object name: fullnameOverride, else "<release>-<name>"
(the release name alone where it already holds the chart name).
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

{{/* "<chart>-<version>", the helm.sh/chart label. */}}
{{- define "fedcifar.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The SuperLink's Deployment, Service, NetworkPolicy and Ingress. */}}
{{- define "fedcifar.superlink.fullname" -}}
{{- printf "%s-superlink" (include "fedcifar.fullname" . | trunc 53 | trimSuffix "-") }}
{{- end }}

{{/* The SuperLink's metrics Service (inside the cluster only). */}}
{{- define "fedcifar.superlink.metricsName" -}}
{{- printf "%s-superlink-metrics" (include "fedcifar.fullname" . | trunc 45 | trimSuffix "-") }}
{{- end }}

{{/* The ConfigMap of the SuperLink's proxy (its nginx.conf). */}}
{{- define "fedcifar.proxy.fullname" -}}
{{- printf "%s-superlink-proxy" (include "fedcifar.fullname" . | trunc 47 | trimSuffix "-") }}
{{- end }}

{{/* The SuperLink's state PVC: superlink.persistence.existingClaim, else the chart's own. */}}
{{- define "fedcifar.superlink.pvcName" -}}
{{- if .Values.superlink.persistence.existingClaim }}
{{- .Values.superlink.persistence.existingClaim }}
{{- else }}
{{- include "fedcifar.superlink.fullname" . }}
{{- end }}
{{- end }}

{{/* The clients' StatefulSet and headless Service (52 characters at most, see above). */}}
{{- define "fedcifar.clients.fullname" -}}
{{- printf "%s-clients" (include "fedcifar.fullname" . | trunc 44 | trimSuffix "-") }}
{{- end }}

{{/* The environment ConfigMap every fedcifar container reads. */}}
{{- define "fedcifar.env.fullname" -}}
{{- printf "%s-env" (include "fedcifar.fullname" . | trunc 59 | trimSuffix "-") }}
{{- end }}

{{/* The ConfigMap of the release's alerting rules (a plain rule file). */}}
{{- define "fedcifar.alerts.fullname" -}}
{{- printf "%s-alerts" (include "fedcifar.fullname" . | trunc 56 | trimSuffix "-") }}
{{- end }}

{{/* The run Job: its name carries the release revision, because Jobs are immutable: each upgrade submits a new run. */}}
{{- define "fedcifar.run.fullname" -}}
{{- printf "%s-run-%d" (include "fedcifar.fullname" . | trunc 50 | trimSuffix "-") (int .Release.Revision) }}
{{- end }}

{{/* The run Job's own ServiceAccount: the only one with a token, for the Control API's port-forward. */}}
{{- define "fedcifar.run.serviceAccountName" -}}
{{- printf "%s-run" (include "fedcifar.fullname" . | trunc 59 | trimSuffix "-") }}
{{- end }}

{{/* The ServiceAccount the other pods use (their token is never mounted). */}}
{{- define "fedcifar.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "fedcifar.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}
