{{/*
The federation as this release sees it: the SuperLink its clients dial (this release's, or a remote
one), the Secret with the CA they verify it with, the site they belong to, the federation's node
slots and the metrics URLs of this release's SuperNodes.
*/}}

{{/* This release's SuperLink: its in-namespace Service name and public port. */}}
{{- define "fedcifar.superlink.address" -}}
{{- printf "%s:%d" (include "fedcifar.superlink.fullname" .) (int .Values.superlink.port) }}
{{- end }}

{{/* The SuperLink the clients dial: this release's, else (a site) clients.superlink.address. */}}
{{- define "fedcifar.clients.superlinkAddress" -}}
{{- if include "fedcifar.runsSuperLink" . }}
{{- include "fedcifar.superlink.address" . }}
{{- else }}
{{- .Values.clients.superlink.address }}
{{- end }}
{{- end }}

{{/* The SuperLink's /health through its public face, as the clients reach it (helm test). */}}
{{- define "fedcifar.superlink.healthURL" -}}
{{- printf "%s://%s/health" (ternary "https" "http" .Values.tls.enabled) (include "fedcifar.clients.superlinkAddress" .) }}
{{- end }}

{{/* The Secret with the CA (ca.crt) of the SuperLink the clients dial. */}}
{{- define "fedcifar.caSecretName" -}}
{{- if include "fedcifar.runsSuperLink" . }}
{{- include "fedcifar.tls.secretName" . }}
{{- else }}
{{- .Values.clients.superlink.caSecret }}
{{- end }}
{{- end }}

{{/* This release's site name: clients.site, else the release name. */}}
{{- define "fedcifar.site" -}}
{{- default .Release.Name .Values.clients.site }}
{{- end }}

{{/* Node slots of this site's view of the federation (clients.partitions.total, else its replicas). */}}
{{- define "fedcifar.clients.totalPartitions" -}}
{{- if kindIs "invalid" .Values.clients.partitions.total }}
{{- .Values.clients.replicas | int }}
{{- else }}
{{- .Values.clients.partitions.total | int }}
{{- end }}
{{- end }}

{{/* The run's node slots: run.numPartitions, else the clients' total. */}}
{{- define "fedcifar.run.numPartitions" -}}
{{- if kindIs "invalid" .Values.run.numPartitions }}
{{- include "fedcifar.clients.totalPartitions" . }}
{{- else }}
{{- .Values.run.numPartitions | int }}
{{- end }}
{{- end }}

{{/* The SuperNodes a round waits for: run.minNodes, else all the run's node slots. */}}
{{- define "fedcifar.run.minNodes" -}}
{{- if kindIs "invalid" .Values.run.minNodes }}
{{- include "fedcifar.run.numPartitions" . }}
{{- else }}
{{- .Values.run.minNodes | int }}
{{- end }}
{{- end }}

{{/* The metrics URLs of this release's SuperNodes (StatefulSet pod DNS names), a JSON list. */}}
{{- define "fedcifar.clients.metricsURLs" -}}
{{- $name := include "fedcifar.clients.fullname" . }}
{{- $urls := list }}
{{- range $i := until (int .Values.clients.replicas) }}
{{- $urls = append $urls (printf "http://%s-%d.%s:%d/metrics" $name $i $name (int $.Values.metrics.port)) }}
{{- end }}
{{- toJson $urls }}
{{- end }}
