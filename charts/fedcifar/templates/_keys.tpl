{{/*
SuperNode authentication: one ECDSA key pair per client ordinal. The private keys (one Secret) are
mounted by the client pods, each container seeing only its own through subPathExpr; the public keys
(another Secret) by the SuperLink, which registers them, and by the run Job.
*/}}

{{/* The SuperNode private keys (supernode-<i>.key): supernodeAuth.existingSecret, else Helm's. */}}
{{- define "fedcifar.auth.privateSecretName" -}}
{{- if .Values.supernodeAuth.existingSecret }}
{{- .Values.supernodeAuth.existingSecret }}
{{- else }}
{{- printf "%s-supernode-keys" (include "fedcifar.fullname" . | trunc 47 | trimSuffix "-") }}
{{- end }}
{{- end }}

{{/* The matching public keys (supernode-<i>.pub): supernodeAuth.existingPublicKeysSecret, else Helm's. */}}
{{- define "fedcifar.auth.publicSecretName" -}}
{{- if .Values.supernodeAuth.existingPublicKeysSecret }}
{{- .Values.supernodeAuth.existingPublicKeysSecret }}
{{- else }}
{{- printf "%s-supernode-public-keys" (include "fedcifar.fullname" . | trunc 40 | trimSuffix "-") }}
{{- end }}
{{- end }}

{{/* Other sites' public keys, which the SuperLink keeps registering: supernodeAuth.siteKeysSecret, else "<fullname>-site-keys". */}}
{{- define "fedcifar.auth.siteKeysSecretName" -}}
{{- if .Values.supernodeAuth.siteKeysSecret }}
{{- .Values.supernodeAuth.siteKeysSecret }}
{{- else }}
{{- printf "%s-site-keys" (include "fedcifar.fullname" . | trunc 53 | trimSuffix "-") }}
{{- end }}
{{- end }}

{{/* "true" where Helm generates the SuperNode key pairs (supernode-keys.yaml): supernodeAuth.existingSecret is empty. */}}
{{- define "fedcifar.auth.helmGenerated" -}}
{{- if and (include "fedcifar.runsClients" .) .Values.supernodeAuth.enabled (not .Values.supernodeAuth.existingSecret) -}}
true
{{- end -}}
{{- end }}

{{/* "true" where the SuperLink and the run Job register this release's own SuperNode keys (all-in-one with supernodeAuth). */}}
{{- define "fedcifar.auth.registersOwnKeys" -}}
{{- if and .Values.supernodeAuth.enabled (include "fedcifar.runsClients" .) }}true{{ end }}
{{- end }}

{{/* Where the keys are mounted: a client's own key, other sites' public keys, this release's public keys. */}}
{{- define "fedcifar.auth.keyDir" -}}/etc/fedcifar/supernode{{- end }}
{{- define "fedcifar.auth.siteKeyDir" -}}/etc/fedcifar/site-public-keys{{- end }}
{{- define "fedcifar.auth.publicKeyDir" -}}/etc/fedcifar/supernode-public-keys{{- end }}

{{/* The public keys volume (SuperLink and run Job). */}}
{{- define "fedcifar.auth.publicKeysVolume" -}}
- name: supernode-public-keys
  secret:
    secretName: {{ include "fedcifar.auth.publicSecretName" . | quote }}
{{- end }}

{{/* Its mount, at fedcifar.auth.publicKeyDir. */}}
{{- define "fedcifar.auth.publicKeysVolumeMount" -}}
- name: supernode-public-keys
  mountPath: {{ include "fedcifar.auth.publicKeyDir" . | quote }}
  readOnly: true
{{- end }}
