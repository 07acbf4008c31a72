{{/*
Checks on values that the schema cannot express, each failing with a sentence that says what to
set. fedcifar.validate runs them all, in this order; configmap-env.yaml, which every release
renders, includes it.
*/}}
{{- define "fedcifar.validate" -}}
{{- include "fedcifar.validate.shape" . }}
{{- include "fedcifar.validate.slots" . }}
{{- include "fedcifar.validate.ingress" . }}
{{- include "fedcifar.validate.storage" . }}
{{- include "fedcifar.validate.run" . }}
{{- include "fedcifar.validate.images" . }}
{{- include "fedcifar.validate.ports" . }}
{{- include "fedcifar.validate.keys" . }}
{{- include "fedcifar.validate.gpu" . }}
{{- include "fedcifar.validate.generatedKeys" . }}
{{- include "fedcifar.validate.publicFace" . }}
{{- end }}

{{/* The release holds something; a site knows its remote SuperLink and its CA; the site name is a DNS label. */}}
{{- define "fedcifar.validate.shape" -}}
{{- $shape := include "fedcifar.shape" . }}
{{- $clients := .Values.clients }}
{{- if not $shape }}
{{- fail "superlink.enabled and clients.enabled are both false: this release would hold nothing. A server release keeps superlink.enabled, a site release keeps clients.enabled." }}
{{- end }}
{{- if lt (int $clients.replicas) 1 }}
{{- fail (printf "clients.replicas must be at least 1, got %v." $clients.replicas) }}
{{- end }}
{{- if eq $shape "site" }}
{{- if not $clients.superlink.address }}
{{- fail "superlink.enabled is false but clients.superlink.address is empty: a site release dials a remote SuperLink; set clients.superlink.address to its host:port (e.g. its NodePort on a node address)." }}
{{- end }}
{{- if and .Values.tls.enabled (not $clients.superlink.caSecret) }}
{{- fail "superlink.enabled is false but clients.superlink.caSecret is empty: create a Secret holding the remote SuperLink's ca.crt in this namespace (kubectl create secret generic NAME --from-file=ca.crt) and set clients.superlink.caSecret to its name." }}
{{- end }}
{{- end }}
{{- if and $clients.superlink.address (include "fedcifar.runsSuperLink" .) }}
{{- fail "clients.superlink.address is set but superlink.enabled is true: the clients of a release with its own SuperLink dial that one; set superlink.enabled=false for a site release." }}
{{- end }}
{{- if and (include "fedcifar.runsClients" .) (not (regexMatch "^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$" (include "fedcifar.site" .))) }}
{{- fail (printf "the site name %q is not a DNS label (lowercase letters, digits and '-', at most 63 characters): set clients.site." (include "fedcifar.site" .)) }}
{{- end }}
{{- end }}

{{/* This site's node slots lie within the federation's, and the run agrees with the SuperNodes on them. */}}
{{- define "fedcifar.validate.slots" -}}
{{- $shape := include "fedcifar.shape" . }}
{{- $clients := .Values.clients }}
{{- $total := include "fedcifar.clients.totalPartitions" . | int }}
{{- if lt (int $clients.partitions.offset) 0 }}
{{- fail (printf "clients.partitions.offset must not be negative, got %v." $clients.partitions.offset) }}
{{- end }}
{{- if gt (add $clients.partitions.offset $clients.replicas) $total }}
{{- fail (printf "clients.partitions.offset (%v) + clients.replicas (%v) is beyond clients.partitions.total (%d): this site's slots must lie within the federation's; raise clients.partitions.total or lower the offset." $clients.partitions.offset $clients.replicas $total) }}
{{- end }}
{{- if and (eq $shape "server") .Values.run.enabled (kindIs "invalid" .Values.run.numPartitions) }}
{{- fail "clients.enabled is false but run.numPartitions is not set: a server release states the federation's node slots (the sum of the sites' clients.replicas)." }}
{{- end }}
{{- if and (eq $shape "all-in-one") (ne (include "fedcifar.run.numPartitions" . | int) $total) }}
{{- fail (printf "run.numPartitions (%s) differs from clients.partitions.total (%d): the run and its SuperNodes must agree on the node slots." (include "fedcifar.run.numPartitions" .) $total) }}
{{- end }}
{{- end }}

{{/* The Ingress passes TLS through to the SuperLink, at a host name the certificate covers. */}}
{{- define "fedcifar.validate.ingress" -}}
{{- if and .Values.superlink.ingress.enabled (not .Values.tls.enabled) }}
{{- fail "superlink.ingress.enabled needs tls.enabled: the Ingress passes TLS through to the SuperLink, which sites verify with its CA." }}
{{- end }}
{{- if and .Values.superlink.ingress.enabled (not .Values.superlink.ingress.host) }}
{{- fail "superlink.ingress.enabled needs superlink.ingress.host: the name SuperNodes dial (it is added to the SuperLink certificate)." }}
{{- end }}
{{- end }}

{{/* The data volume is one of a claim or a host path; an existing state claim needs persistence. */}}
{{- define "fedcifar.validate.storage" -}}
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
{{- end }}

{{/* The run's values: enough node slots, no repeated run-config key, numbers in their ranges. */}}
{{- define "fedcifar.validate.run" -}}
{{- if gt (include "fedcifar.run.minNodes" . | int) (include "fedcifar.run.numPartitions" . | int) }}
{{- fail (printf "run.minNodes (%v) is larger than the federation's node slots (%s): the run would wait forever for clients that do not exist." .Values.run.minNodes (include "fedcifar.run.numPartitions" .)) }}
{{- end }}
{{- $builtin := include "fedcifar.runConfig.builtinKeys" . | fromJsonArray }}
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
{{- if and .Values.tracking.mlflow.server.enabled .Values.tracking.mlflow.uri }}
{{- fail (printf "tracking.mlflow.server.enabled runs the release's own MLflow server, and the ServerApp logs to it; tracking.mlflow.uri (%s) names another: set one of them." .Values.tracking.mlflow.uri) }}
{{- end }}
{{- if and .Values.tracking.mlflow.server.enabled (not (include "fedcifar.runsSuperLink" .)) }}
{{- fail "tracking.mlflow.server.enabled runs the MLflow server in the SuperLink pod, which this release (a site: superlink.enabled=false) does not run; leave it false." }}
{{- end }}
{{- if and .Values.tracking.mlflow.perSlot (has .Values.run.dp (list "server-fixed" "server-adaptive" "client-fixed" "client-adaptive")) }}
{{- fail (printf "tracking.mlflow.perSlot is refused under central DP (run.dp=%s): each slot's figures are un-noised figures of a site's data; set it to false." .Values.run.dp) }}
{{- end }}
{{- end }}

{{/* Images have fixed tags. */}}
{{- define "fedcifar.validate.images" -}}
{{- if or (eq .Values.image.tag "latest") (eq .Values.clients.gpu.image.tag "latest") }}
{{- fail "image.tag and clients.gpu.image.tag must be fixed versions, not \"latest\"." }}
{{- end }}
{{- end }}

{{/* The ports a pod listens on differ. */}}
{{- define "fedcifar.validate.ports" -}}
{{- $ports := dict "superlink.port" .Values.superlink.port "superlink.controlPort" .Values.superlink.controlPort "superlink.outputsPort" .Values.superlink.outputsPort "metrics.port" .Values.metrics.port }}
{{- if .Values.tracking.mlflow.server.enabled }}
{{- $_ := set $ports "tracking.mlflow.server.port" .Values.tracking.mlflow.server.port }}
{{- end }}
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
{{- end }}

{{/* SuperNode authentication runs over TLS, with both halves of given keys. */}}
{{- define "fedcifar.validate.keys" -}}
{{- if and .Values.supernodeAuth.enabled (not .Values.tls.enabled) }}
{{- fail "supernodeAuth.enabled needs tls.enabled: Flower refuses SuperNode authentication over plaintext (--enable-supernode-auth with --insecure)." }}
{{- end }}
{{- if ne (empty .Values.supernodeAuth.existingSecret) (empty .Values.supernodeAuth.existingPublicKeysSecret) }}
{{- fail "supernodeAuth.existingSecret and supernodeAuth.existingPublicKeysSecret go together: set both (private keys supernode-<i>.key, public keys supernode-<i>.pub) or neither." }}
{{- end }}
{{- end }}

{{/* GPU clients ask for at least one GPU. */}}
{{- define "fedcifar.validate.gpu" -}}
{{- if and .Values.clients.gpu.enabled (lt (int .Values.clients.gpu.count) 1) }}
{{- fail "clients.gpu.enabled is true but clients.gpu.count is below 1: request at least one GPU per client." }}
{{- end }}
{{- end }}

{{/* allowHelmGeneratedKeys=false: Helm generates no key (they would stay in every release revision). */}}
{{- define "fedcifar.validate.generatedKeys" -}}
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
{{- end }}

{{/* Nothing opens Flower's APIs beside the proxy and the Fleet guard; the proxy's body limit is an nginx size. */}}
{{- define "fedcifar.validate.publicFace" -}}
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
