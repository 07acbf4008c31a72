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
helm.sh/chart: {{ include "fedcifar.chart" . | quote }}
{{ include "fedcifar.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service | quote }}
app.kubernetes.io/part-of: {{ include "fedcifar.name" . | quote }}
{{- end }}

{{/*
Selector labels
*/}}
{{- define "fedcifar.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fedcifar.name" . | quote }}
app.kubernetes.io/instance: {{ .Release.Name | quote }}
{{- end }}

{{/*
Component labels and selector labels: call with (dict "root" $ "component" "superlink").
*/}}
{{- define "fedcifar.componentLabels" -}}
{{ include "fedcifar.labels" .root }}
app.kubernetes.io/component: {{ .component | quote }}
{{- end }}

{{- define "fedcifar.componentSelectorLabels" -}}
{{ include "fedcifar.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component | quote }}
{{- end }}

{{/*
Object names. The StatefulSet name stays within 52 characters, because the controller adds
"-<10 character hash>" to it in the controller-revision-hash label (at most 63 characters).
*/}}
{{- define "fedcifar.superlink.fullname" -}}
{{- printf "%s-superlink" (include "fedcifar.fullname" . | trunc 53 | trimSuffix "-") }}
{{- end }}

{{- define "fedcifar.superlink.metricsName" -}}
{{- printf "%s-superlink-metrics" (include "fedcifar.fullname" . | trunc 45 | trimSuffix "-") }}
{{- end }}

{{- define "fedcifar.proxy.fullname" -}}
{{- printf "%s-superlink-proxy" (include "fedcifar.fullname" . | trunc 47 | trimSuffix "-") }}
{{- end }}

{{/* The run Job's own ServiceAccount: the only one with a token, for the Control API's port-forward. */}}
{{- define "fedcifar.run.serviceAccountName" -}}
{{- printf "%s-run" (include "fedcifar.fullname" . | trunc 59 | trimSuffix "-") }}
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

{{/* The SuperLink container's probes ask Flower itself on the loopback (not through the proxy). */}}
{{- define "fedcifar.superlink.localHealthCommand" -}}
{{- $url := printf "%s://127.0.0.1:%d/health" (ternary "https" "http" .Values.tls.enabled) (int .Values.superlink.controlPort) -}}
{{- $context := ternary (printf "ssl.create_default_context(cafile=%s)" (include "fedcifar.tls.caFile" . | quote)) "None" .Values.tls.enabled -}}
{{- list "python3" "-c" (printf "import ssl, urllib.request; urllib.request.urlopen(%s, timeout=4, context=%s)" ($url | quote) $context) | toJson -}}
{{- end }}

{{- define "fedcifar.superlink.healthURL" -}}
{{- printf "%s://%s/health" (ternary "https" "http" .Values.tls.enabled) (include "fedcifar.clients.superlinkAddress" .) }}
{{- end }}

{{/*
Cross-silo shapes: the SuperLink the clients dial (this release's, or a remote one), the Secret
with the CA they verify it with, the site they belong to, and the federation's node slots.
*/}}
{{- define "fedcifar.clients.superlinkAddress" -}}
{{- if .Values.superlink.enabled }}
{{- include "fedcifar.superlink.address" . }}
{{- else }}
{{- .Values.clients.superlink.address }}
{{- end }}
{{- end }}

{{- define "fedcifar.caSecretName" -}}
{{- if .Values.superlink.enabled }}
{{- include "fedcifar.tls.secretName" . }}
{{- else }}
{{- .Values.clients.superlink.caSecret }}
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

{{/* The longest one run attempt may take: every round's training attempts, its evaluation and its
wait for SuperNodes, each bounded by round-timeout. */}}
{{- define "fedcifar.run.attemptSeconds" -}}
{{- mulf (float64 .Values.run.rounds) (float64 .Values.run.roundTimeout) (float64 (add (int .Values.run.roundRetries) 3)) | ceil | int }}
{{- end }}

{{/* run.activeDeadlineSeconds, else every attempt of the Job (backoffLimit + 1) waiting its longest. */}}
{{- define "fedcifar.run.activeDeadlineSeconds" -}}
{{- if kindIs "invalid" .Values.run.activeDeadlineSeconds }}
{{- mul (add (int .Values.run.backoffLimit) 1) (add (int .Values.run.waitTimeoutSeconds) (include "fedcifar.run.attemptSeconds" . | int)) }}
{{- else }}
{{- .Values.run.activeDeadlineSeconds | int }}
{{- end }}
{{- end }}

{{- define "fedcifar.run.minNodes" -}}
{{- if kindIs "invalid" .Values.run.minNodes }}
{{- include "fedcifar.run.numPartitions" . }}
{{- else }}
{{- .Values.run.minNodes | int }}
{{- end }}
{{- end }}

{{/*
TLS: the Secret with ca.crt, tls.crt and tls.key (given, made by cert-manager, or generated by Helm),
where pods mount it, and the names the SuperLink certificate covers.
*/}}
{{- define "fedcifar.tls.secretName" -}}
{{- if .Values.tls.existingSecret }}
{{- .Values.tls.existingSecret }}
{{- else }}
{{- printf "%s-tls" (include "fedcifar.superlink.fullname" . | trunc 59 | trimSuffix "-") }}
{{- end }}
{{- end }}

{{/* The Helm-generated CA (ca.crt, ca.key), kept apart from the TLS Secret that pods mount. */}}
{{- define "fedcifar.tls.caKeySecretName" -}}
{{- printf "%s-ca" (include "fedcifar.superlink.fullname" . | trunc 60 | trimSuffix "-") }}
{{- end }}

{{- define "fedcifar.tls.useCertManager" -}}
{{- if and .Values.superlink.enabled .Values.tls.enabled (not .Values.tls.existingSecret) .Values.tls.certManager.enabled (.Capabilities.APIVersions.Has "cert-manager.io/v1") -}}
true
{{- end -}}
{{- end }}

{{/* Helm generates the SuperLink's CA and TLS keys (tls-secret.yaml): neither tls.existingSecret nor cert-manager provides them. */}}
{{- define "fedcifar.tls.helmGenerated" -}}
{{- if and .Values.superlink.enabled .Values.tls.enabled (not .Values.tls.existingSecret) (not (include "fedcifar.tls.useCertManager" .)) -}}
true
{{- end -}}
{{- end }}

{{- define "fedcifar.tls.dir" -}}/etc/fedcifar/tls{{- end }}
{{- define "fedcifar.tls.caFile" -}}{{ include "fedcifar.tls.dir" . }}/ca.crt{{- end }}

{{- define "fedcifar.tls.dnsNames" -}}
{{- $svc := include "fedcifar.superlink.fullname" . -}}
{{- $ns := .Release.Namespace -}}
{{- $names := list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.%s" $svc $ns .Values.tls.clusterDomain) "localhost" -}}
{{- if and .Values.superlink.ingress.enabled .Values.superlink.ingress.host }}{{ $names = append $names .Values.superlink.ingress.host }}{{ end -}}
{{- concat $names .Values.tls.extraDnsNames | uniq | toJson -}}
{{- end }}

{{- define "fedcifar.tls.ipAddresses" -}}
{{- concat (list "127.0.0.1") .Values.tls.extraIpAddresses | uniq | toJson -}}
{{- end }}

{{/*
SuperNode authentication: one ECDSA key pair per client ordinal. The private keys (one Secret) are
mounted by the client pods, each container seeing only its own through subPathExpr; the public keys
(another Secret) by the SuperLink, which registers them, and by the run Job.
*/}}
{{- define "fedcifar.auth.privateSecretName" -}}
{{- if .Values.supernodeAuth.existingSecret }}
{{- .Values.supernodeAuth.existingSecret }}
{{- else }}
{{- printf "%s-supernode-keys" (include "fedcifar.fullname" . | trunc 47 | trimSuffix "-") }}
{{- end }}
{{- end }}

{{- define "fedcifar.auth.publicSecretName" -}}
{{- if .Values.supernodeAuth.existingPublicKeysSecret }}
{{- .Values.supernodeAuth.existingPublicKeysSecret }}
{{- else }}
{{- printf "%s-supernode-public-keys" (include "fedcifar.fullname" . | trunc 40 | trimSuffix "-") }}
{{- end }}
{{- end }}

{{- define "fedcifar.auth.siteKeysSecretName" -}}
{{- if .Values.supernodeAuth.siteKeysSecret }}
{{- .Values.supernodeAuth.siteKeysSecret }}
{{- else }}
{{- printf "%s-site-keys" (include "fedcifar.fullname" . | trunc 53 | trimSuffix "-") }}
{{- end }}
{{- end }}

{{/* Helm generates the SuperNode key pairs (supernode-keys.yaml): supernodeAuth.existingSecret is empty. */}}
{{- define "fedcifar.auth.helmGenerated" -}}
{{- if and .Values.clients.enabled .Values.supernodeAuth.enabled (not .Values.supernodeAuth.existingSecret) -}}
true
{{- end -}}
{{- end }}

{{- define "fedcifar.auth.keyDir" -}}/etc/fedcifar/supernode{{- end }}
{{- define "fedcifar.auth.siteKeyDir" -}}/etc/fedcifar/site-public-keys{{- end }}
{{- define "fedcifar.auth.publicKeyDir" -}}/etc/fedcifar/supernode-public-keys{{- end }}
{{- define "fedcifar.readyFile" -}}/var/run/fedcifar/superlink-ready{{- end }}

{{/* The CA volume (ca.crt only) for pods that verify the SuperLink: clients, run Job, helm test. */}}
{{- define "fedcifar.tls.caVolume" -}}
- name: tls-ca
  secret:
    secretName: {{ include "fedcifar.caSecretName" . | quote }}
    items:
      - key: ca.crt
        path: ca.crt
{{- end }}

{{- define "fedcifar.tls.caVolumeMount" -}}
- name: tls-ca
  mountPath: {{ include "fedcifar.tls.dir" . | quote }}
  readOnly: true
{{- end }}

{{- define "fedcifar.auth.publicKeysVolume" -}}
- name: supernode-public-keys
  secret:
    secretName: {{ include "fedcifar.auth.publicSecretName" . | quote }}
{{- end }}

{{- define "fedcifar.auth.publicKeysVolumeMount" -}}
- name: supernode-public-keys
  mountPath: {{ include "fedcifar.auth.publicKeyDir" . | quote }}
  readOnly: true
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
  (printf "min-nodes=%d" (include "fedcifar.run.minNodes" . | int))
  (printf "num-partitions=%d" (include "fedcifar.run.numPartitions" . | int))
  (printf "round-timeout=%s" (include "fedcifar.tomlFloat" $run.roundTimeout))
  (printf "seed=%d" (int $run.seed))
  (printf "device=%s" (toJson $run.device))
  (printf "round-retries=%d" (int $run.roundRetries))
  (printf "resume=%t" $run.resume)
  (printf "strategy=%s" (toJson $run.strategy))
  (printf "trim-beta=%s" (include "fedcifar.tomlFloat" $run.trimBeta))
  (printf "num-malicious-nodes=%d" (int $run.numMaliciousNodes))
  (printf "num-nodes-to-select=%d" (int $run.numNodesToSelect))
  (printf "max-examples=%d" (int $run.maxExamples))
  (printf "proximal-mu=%s" (include "fedcifar.tomlFloat" $run.proximalMu))
  (printf "eta=%s" (include "fedcifar.tomlFloat" $run.eta))
  (printf "server-momentum=%s" (include "fedcifar.tomlFloat" $run.serverMomentum))
  (printf "dp=%s" (toJson $run.dp))
  (printf "noise-multiplier=%s" (include "fedcifar.tomlFloat" $run.noiseMultiplier))
  (printf "clipping-norm=%s" (include "fedcifar.tomlFloat" $run.clippingNorm))
  (printf "dp-delta=%s" (include "fedcifar.tomlFloat" $run.dpDelta))
-}}
{{- if not (hasKey $run.extraConfig "out-dir") }}
{{- /* per revision, on the SuperLink's state volume: a Job retry resumes from its checkpoint */}}
{{- $pairs = append $pairs (printf "out-dir=%s" (toJson (printf "%s/runs/revision-%d" (include "fedcifar.stateDir" .) (int .Release.Revision)))) }}
{{- end }}
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
{{- $clients := .Values.clients }}
{{- if not (or .Values.superlink.enabled $clients.enabled) }}
{{- fail "superlink.enabled and clients.enabled are both false: this release would hold nothing. A server release keeps superlink.enabled, a site release keeps clients.enabled." }}
{{- end }}
{{- if lt (int $clients.replicas) 1 }}
{{- fail (printf "clients.replicas must be at least 1, got %v." $clients.replicas) }}
{{- end }}
{{- if and $clients.enabled (not .Values.superlink.enabled) }}
{{- if not $clients.superlink.address }}
{{- fail "superlink.enabled is false but clients.superlink.address is empty: a site release dials a remote SuperLink; set clients.superlink.address to its host:port (e.g. its NodePort on a node address)." }}
{{- end }}
{{- if and .Values.tls.enabled (not $clients.superlink.caSecret) }}
{{- fail "superlink.enabled is false but clients.superlink.caSecret is empty: create a Secret holding the remote SuperLink's ca.crt in this namespace (kubectl create secret generic NAME --from-file=ca.crt) and set clients.superlink.caSecret to its name." }}
{{- end }}
{{- end }}
{{- if and $clients.superlink.address .Values.superlink.enabled }}
{{- fail "clients.superlink.address is set but superlink.enabled is true: the clients of a release with its own SuperLink dial that one; set superlink.enabled=false for a site release." }}
{{- end }}
{{- if and $clients.enabled (not (regexMatch "^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$" (include "fedcifar.site" .))) }}
{{- fail (printf "the site name %q is not a DNS label (lowercase letters, digits and '-', at most 63 characters): set clients.site." (include "fedcifar.site" .)) }}
{{- end }}
{{- $total := include "fedcifar.clients.totalPartitions" . | int }}
{{- if lt (int $clients.partitions.offset) 0 }}
{{- fail (printf "clients.partitions.offset must not be negative, got %v." $clients.partitions.offset) }}
{{- end }}
{{- if gt (add $clients.partitions.offset $clients.replicas) $total }}
{{- fail (printf "clients.partitions.offset (%v) + clients.replicas (%v) is beyond clients.partitions.total (%d): this site's slots must lie within the federation's; raise clients.partitions.total or lower the offset." $clients.partitions.offset $clients.replicas $total) }}
{{- end }}
{{- if and .Values.superlink.enabled .Values.run.enabled (not $clients.enabled) (kindIs "invalid" .Values.run.numPartitions) }}
{{- fail "clients.enabled is false but run.numPartitions is not set: a server release states the federation's node slots (the sum of the sites' clients.replicas)." }}
{{- end }}
{{- if and $clients.enabled .Values.superlink.enabled (ne (include "fedcifar.run.numPartitions" . | int) $total) }}
{{- fail (printf "run.numPartitions (%s) differs from clients.partitions.total (%d): the run and its SuperNodes must agree on the node slots." (include "fedcifar.run.numPartitions" .) $total) }}
{{- end }}
{{- if and .Values.superlink.ingress.enabled (not .Values.tls.enabled) }}
{{- fail "superlink.ingress.enabled needs tls.enabled: the Ingress passes TLS through to the SuperLink, which sites verify with its CA." }}
{{- end }}
{{- if and .Values.superlink.ingress.enabled (not .Values.superlink.ingress.host) }}
{{- fail "superlink.ingress.enabled needs superlink.ingress.host: the name SuperNodes dial (it is added to the SuperLink certificate)." }}
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
{{- if gt (include "fedcifar.run.minNodes" . | int) (include "fedcifar.run.numPartitions" . | int) }}
{{- fail (printf "run.minNodes (%v) is larger than the federation's node slots (%s): the run would wait forever for clients that do not exist." .Values.run.minNodes (include "fedcifar.run.numPartitions" .)) }}
{{- end }}
{{- $builtin := list "num-server-rounds" "local-epochs" "batch-size" "learning-rate" "momentum" "partitioner" "dirichlet-alpha" "fraction-train" "fraction-evaluate" "min-nodes" "num-partitions" "round-timeout" "seed" "device" "round-retries" "resume" "strategy" "trim-beta" "num-malicious-nodes" "num-nodes-to-select" "max-examples" "proximal-mu" "eta" "server-momentum" "dp" "noise-multiplier" "clipping-norm" "dp-delta" }}
{{- range $key, $_ := .Values.run.extraConfig }}
{{- if has $key $builtin }}
{{- fail (printf "run.extraConfig.%s repeats a run-config key that the chart sets from run.*: set the matching camelCase value under run instead." $key) }}
{{- end }}
{{- end }}
{{- $beta := float64 .Values.run.trimBeta }}
{{- if or (lt $beta 0.0) (ge $beta 0.5) }}
{{- fail (printf "run.trimBeta is the fraction strategy fedtrimmedavg cuts at each end and must lie in [0, 0.5), got %v." .Values.run.trimBeta) }}
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
{{- $ports := dict "superlink.port" .Values.superlink.port "superlink.controlPort" .Values.superlink.controlPort "metrics.port" .Values.metrics.port }}
{{- range $a := keys $ports | sortAlpha }}
{{- range $b := keys $ports | sortAlpha }}
{{- if and (lt $a $b) (eq (int (get $ports $a)) (int (get $ports $b))) }}
{{- fail (printf "%s and %s are both %v: the SuperLink pod listens on each, so they must differ." $a $b (get $ports $a)) }}
{{- end }}
{{- end }}
{{- end }}
{{- if eq (int .Values.clients.port) (int .Values.metrics.port) }}
{{- fail (printf "clients.port and metrics.port are both %v: a SuperNode pod listens on each, so they must differ." .Values.metrics.port) }}
{{- end }}
{{- if and .Values.supernodeAuth.enabled (not .Values.tls.enabled) }}
{{- fail "supernodeAuth.enabled needs tls.enabled: Flower refuses SuperNode authentication over plaintext (--enable-supernode-auth with --insecure)." }}
{{- end }}
{{- if ne (empty .Values.supernodeAuth.existingSecret) (empty .Values.supernodeAuth.existingPublicKeysSecret) }}
{{- fail "supernodeAuth.existingSecret and supernodeAuth.existingPublicKeysSecret go together: set both (private keys supernode-<i>.key, public keys supernode-<i>.pub) or neither." }}
{{- end }}
{{- if and .Values.clients.gpu.enabled (lt (int .Values.clients.gpu.count) 1) }}
{{- fail "clients.gpu.enabled is true but clients.gpu.count is below 1: request at least one GPU per client." }}
{{- end }}
{{- if not .Values.allowHelmGeneratedKeys }}
{{- $generated := list }}
{{- if include "fedcifar.tls.helmGenerated" . }}
{{- $generated = append $generated (printf "the SuperLink's CA and TLS keys (Secrets %s, %s): set tls.existingSecret to a Secret with ca.crt, tls.crt and tls.key, or let cert-manager issue the certificate (tls.certManager.enabled, on a cluster that serves cert-manager.io/v1)" (include "fedcifar.tls.caKeySecretName" .) (include "fedcifar.tls.secretName" .)) }}
{{- end }}
{{- if include "fedcifar.auth.helmGenerated" . }}
{{- $generated = append $generated (printf "the SuperNode private keys (Secret %s): set supernodeAuth.existingSecret and supernodeAuth.existingPublicKeysSecret" (include "fedcifar.auth.privateSecretName" .)) }}
{{- end }}
{{- with $generated }}
{{- fail (printf "allowHelmGeneratedKeys is false, but Helm would generate %s. Helm keeps every manifest it renders, keys included, in each release revision (Secrets sh.helm.release.v1.%s.v<revision>)." (join "; and " .) $.Release.Name) }}
{{- end }}
{{- end }}
{{- if not (regexMatch "^[1-9][0-9]*[kKmM]?$" (toString .Values.superlink.proxy.maxBodySize)) }}
{{- fail (printf "superlink.proxy.maxBodySize must be an nginx size (bytes, or a number with k or m, e.g. 6m), got %q: it is written into the proxy's nginx.conf." (toString .Values.superlink.proxy.maxBodySize)) }}
{{- end }}
{{- range .Values.superlink.extraArgs }}
{{- if regexMatch "^--(ho|fleet-api-a|control-api-a)" . }}{{/* and their abbreviations, as Flower's parser takes them */}}
{{- fail (printf "superlink.extraArgs holds %s: Flower would serve its APIs beside the proxy and the Fleet guard. Flower listens on the pod's loopback (superlink.controlPort) and the proxy is its public face (superlink.port)." .) }}
{{- end }}
{{- end }}
{{- range $where, $env := dict "extraEnv" .Values.extraEnv "superlink.extraEnv" .Values.superlink.extraEnv }}
{{- range $name, $_ := $env }}
{{- if hasPrefix "FLWR_INTERNAL_GRPC_" $name }}
{{- fail (printf "%s sets %s: Flower would open its legacy gRPC API beside the guarded one; remove it." $where $name) }}
{{- end }}
{{- end }}
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
  mountPath: {{ include "fedcifar.runDir" . | quote }}
- name: cache
  mountPath: {{ include "fedcifar.cacheDir" . | quote }}
{{- end }}

{{/*
The read-only data volume (data.source=volume).
*/}}
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

{{- define "fedcifar.dataVolumeMount" -}}
- name: data
  mountPath: {{ .Values.data.mountPath | quote }}
  readOnly: true
  {{- with .Values.data.volume.subPath }}
  subPath: {{ . | quote }}
  {{- end }}
{{- end }}

{{/*
A map of NAME: value as a container env list.
*/}}
{{- define "fedcifar.envList" -}}
{{- range $name := keys . | sortAlpha }}
- name: {{ $name | quote }}
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

{{/*
A label map as a Kubernetes label selector string: k1=v1,k2=v2 (sorted).
*/}}
{{- define "fedcifar.selectorString" -}}
{{- $pairs := list }}
{{- range $k := keys . | sortAlpha }}
{{- $pairs = append $pairs (printf "%s=%s" $k (get $ $k)) }}
{{- end }}
{{- join "," $pairs }}
{{- end }}
