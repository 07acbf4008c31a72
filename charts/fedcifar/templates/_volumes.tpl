{{/*
Fixed paths inside the pods (the image runs with a read-only root filesystem), and the volumes
every fedcifar pod mounts there.
*/}}
{{- define "fedcifar.runDir" -}}/var/run/fedcifar{{- end }}
{{- define "fedcifar.metricsDir" -}}/var/run/fedcifar/metrics{{- end }}
{{- define "fedcifar.flwrHome" -}}/var/run/fedcifar/flwr{{- end }}
{{- define "fedcifar.cacheDir" -}}/var/cache/fedcifar{{- end }}
{{- define "fedcifar.stateDir" -}}/var/lib/fedcifar{{- end }}
{{- define "fedcifar.readyFile" -}}/var/run/fedcifar/superlink-ready{{- end }}

{{/* Writable emptyDirs every fedcifar pod mounts: /tmp, the run folder (metrics, FLWR_HOME) and caches. */}}
{{- define "fedcifar.commonVolumes" -}}
- name: tmp
  emptyDir: {}
- name: run
  emptyDir: {}
- name: cache
  emptyDir: {}
{{- end }}

{{/* Their mounts. */}}
{{- define "fedcifar.commonVolumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: run
  mountPath: {{ include "fedcifar.runDir" . | quote }}
- name: cache
  mountPath: {{ include "fedcifar.cacheDir" . | quote }}
{{- end }}

{{/* The read-only data volume (data.source=volume): a PVC or a host directory. */}}
{{- define "fedcifar.dataVolume" -}}
- name: data
  {{- if .Values.data.volume.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ .Values.data.volume.existingClaim | quote }}
    readOnly: true
  {{- else }}
  hostPath:
    path: {{ .Values.data.volume.hostPath | quote }}
    type: Directory
  {{- end }}
{{- end }}

{{/* Its mount, at data.mountPath. */}}
{{- define "fedcifar.dataVolumeMount" -}}
- name: data
  mountPath: {{ .Values.data.mountPath | quote }}
  readOnly: true
  {{- with .Values.data.volume.subPath }}
  subPath: {{ . | quote }}
  {{- end }}
{{- end }}
