{{/*
The release's shape, named once (README, "Cross-silo federation"; values.yaml's header):
- all-in-one: the SuperLink, its run Job and this release's SuperNodes (the defaults);
- server: the SuperLink and the run Job; the SuperNodes run at the sites (clients.enabled=false);
- site: SuperNodes that join a remote SuperLink (superlink.enabled=false).
Empty when both are off, which fedcifar.validate.shape refuses. Templates read the shape through
these helpers, never the two booleans.
*/}}
{{- define "fedcifar.shape" -}}
{{- $superlink := .Values.superlink.enabled }}
{{- $clients := .Values.clients.enabled }}
{{- if and $superlink $clients }}all-in-one
{{- else if $superlink }}server
{{- else if $clients }}site
{{- end }}
{{- end }}

{{/* "true" where the release runs the SuperLink (all-in-one, server), else empty. */}}
{{- define "fedcifar.runsSuperLink" -}}
{{- if has (include "fedcifar.shape" .) (list "all-in-one" "server") }}true{{ end }}
{{- end }}

{{/* "true" where the release runs SuperNodes of its own (all-in-one, site), else empty. */}}
{{- define "fedcifar.runsClients" -}}
{{- if has (include "fedcifar.shape" .) (list "all-in-one" "site") }}true{{ end }}
{{- end }}

{{/* "true" where the release submits a run (a SuperLink and run.enabled): the run Job and its RBAC. */}}
{{- define "fedcifar.submitsRun" -}}
{{- if and (include "fedcifar.runsSuperLink" .) .Values.run.enabled }}true{{ end }}
{{- end }}
