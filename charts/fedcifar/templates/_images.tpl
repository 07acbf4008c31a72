{{/*
Images: the CPU image everywhere, the CUDA image for the clients when clients.gpu.enabled.
*/}}

{{/* The CPU image: image.repository:image.tag. */}}
{{- define "fedcifar.image" -}}
{{- printf "%s:%s" .Values.image.repository .Values.image.tag }}
{{- end }}

{{/* The clients' image: the CUDA image with clients.gpu.enabled, else the CPU image. */}}
{{- define "fedcifar.clients.image" -}}
{{- if .Values.clients.gpu.enabled }}
{{- printf "%s:%s" (default .Values.image.repository .Values.clients.gpu.image.repository) .Values.clients.gpu.image.tag }}
{{- else }}
{{- include "fedcifar.image" . }}
{{- end }}
{{- end }}
