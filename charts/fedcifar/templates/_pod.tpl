{{/*
The pod scaffold every pod of the chart shares: the SuperLink Deployment, the clients' StatefulSet,
the run Job and the helm test pod. Labels and checksum annotations, the service account, the pod and
container security contexts, image, resources and the scheduling trailer are rendered here only, so
a setting for every pod is one edit of one helper.

The pod helpers take one dict (a template builds it once, as $pod):
  root                           the chart's root context ($)
  component                      the app.kubernetes.io/component label
  pod                            the component's values (.Values.superlink, .clients, .run, .tests):
                                 podLabels, podAnnotations, priorityClassName, nodeSelector, affinity
                                 and tolerations, where it has them
  annotations                    further pod annotations, as YAML text (optional)
  scrape                         true: the Prometheus scrape annotations (optional)
  serviceAccountName             optional; default fedcifar.serviceAccountName
  automountServiceAccountToken   optional; default false
  terminationGracePeriodSeconds  optional
  runtimeClassName               optional
  image                          the container image (optional; default fedcifar.image)
  resources                      the container's resources (a second container passes its own dict)
  extraLimits                    limits added to resources, e.g. GPUs (optional)
  extraTolerations               tolerations added to pod.tolerations (optional)
*/}}

{{/* A pod template's metadata: labels and annotations. */}}
{{- define "fedcifar.pod.metadata" -}}
labels:
  {{- include "fedcifar.pod.labels" . | nindent 2 }}
annotations:
  {{- include "fedcifar.pod.annotations" . | nindent 2 }}
{{- end }}

{{/* A pod's labels: its component's, then pod.podLabels. */}}
{{- define "fedcifar.pod.labels" -}}
{{ include "fedcifar.componentLabels" (dict "root" .root "component" .component) }}
{{- with get .pod "podLabels" }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* A pod's annotations: the config checksum, the caller's, the scrape annotations, then pod.podAnnotations. */}}
{{- define "fedcifar.pod.annotations" -}}
{{ include "fedcifar.configChecksum" .root }}
{{- with get . "annotations" }}
{{ . }}
{{- end }}
{{- if get . "scrape" }}
{{ include "fedcifar.scrapeAnnotations" .root }}
{{- end }}
{{- with get .pod "podAnnotations" }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Rolls pods when the environment ConfigMap they read changes. */}}
{{- define "fedcifar.configChecksum" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap-env.yaml") . | sha256sum }}
{{- end }}

{{/* Prometheus scrape annotations for a pod template (metrics.scrapeAnnotations). */}}
{{- define "fedcifar.scrapeAnnotations" -}}
{{- if .Values.metrics.scrapeAnnotations -}}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .Values.metrics.port | int | toString | quote }}
prometheus.io/path: "/metrics"
{{- end }}
{{- end }}

{{/* The pod-level settings every pod shares: identity (no token unless asked), image pull Secrets, priority, runtime class, security context. */}}
{{- define "fedcifar.pod.settings" -}}
serviceAccountName: {{ get . "serviceAccountName" | default (include "fedcifar.serviceAccountName" .root) | quote }}
automountServiceAccountToken: {{ get . "automountServiceAccountToken" | default false }}
enableServiceLinks: false
{{- if hasKey . "terminationGracePeriodSeconds" }}
terminationGracePeriodSeconds: {{ .terminationGracePeriodSeconds | int }}
{{- end }}
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with get .pod "priorityClassName" }}
priorityClassName: {{ . | quote }}
{{- end }}
{{- with get . "runtimeClassName" }}
runtimeClassName: {{ . | quote }}
{{- end }}
securityContext:
  {{- toYaml .root.Values.podSecurityContext | nindent 2 }}
{{- end }}

{{/*
The scheduling trailer of a pod spec: pod.nodeSelector, pod.affinity, pod.tolerations (+ extraTolerations).
Empty where none is set, so a template includes it as
  {{- with include "fedcifar.pod.scheduling" $pod | trim }}{{ . | nindent 6 }}{{ end }}
(an empty one leaves no blank line).
*/}}
{{- define "fedcifar.pod.scheduling" -}}
{{- with get .pod "nodeSelector" }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with get .pod "affinity" }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with concat (get .pod "tolerations" | default list) (get . "extraTolerations" | default list) }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* A container's image (image, else fedcifar.image) and pull policy. */}}
{{- define "fedcifar.container.image" -}}
image: {{ get . "image" | default (include "fedcifar.image" .root) | quote }}
imagePullPolicy: {{ .root.Values.image.pullPolicy | quote }}
{{- end }}

{{/* The environment ConfigMap every fedcifar container reads. */}}
{{- define "fedcifar.container.envFrom" -}}
envFrom:
  - configMapRef:
      name: {{ include "fedcifar.env.fullname" . | quote }}
{{- end }}

{{/* A container's security context (securityContext) and its resources (+ extraLimits). */}}
{{- define "fedcifar.container.securityContextAndResources" -}}
securityContext:
  {{- toYaml .root.Values.securityContext | nindent 2 }}
{{- $resources := deepCopy (get . "resources" | default dict) }}
{{- with get . "extraLimits" }}
{{- $limits := get $resources "limits" | default dict }}
{{- range $name, $value := . }}
{{- $_ := set $limits $name $value }}
{{- end }}
{{- $_ := set $resources "limits" $limits }}
{{- end }}
{{- with $resources }}
resources:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* A map of NAME: value as a container env list (sorted). */}}
{{- define "fedcifar.envList" -}}
{{- range $name := keys . | sortAlpha }}
- name: {{ $name | quote }}
  value: {{ get $ $name | toString | quote }}
{{- end }}
{{- end }}
