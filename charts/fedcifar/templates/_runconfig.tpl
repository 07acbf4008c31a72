{{/*
The run: the Flower run config passed to `flwr run --run-config` (TOML values) and the run Job's
time bounds.
*/}}

{{/* A TOML float: Go prints 1.0 as "1", TOML wants "1.0". */}}
{{- define "fedcifar.tomlFloat" -}}
{{- $s := toString (float64 .) -}}
{{- if or (contains "." $s) (contains "e" $s) (contains "Inf" $s) (contains "NaN" $s) -}}
{{- $s -}}
{{- else -}}
{{- printf "%s.0" $s -}}
{{- end -}}
{{- end }}

{{/* A TOML value for run.extraConfig: strings quoted, booleans bare, whole numbers as integers. */}}
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

{{/* The Flower run config: the run.* value of every key in fedcifar.runConfig.keys (int, float, str,
bool, or computed by the fedcifar.run.<value> helper), then run.extraConfig (sorted). */}}
{{- define "fedcifar.runConfig" -}}
{{- $root := . -}}
{{- $run := .Values.run -}}
{{- $pairs := list -}}
{{- range $line := splitList "\n" (include "fedcifar.runConfig.keys" .) }}
{{- $entry := splitList ":" $line }}
{{- $name := index $entry 0 }}{{- $key := index $entry 1 }}{{- $kind := index $entry 2 }}
{{- $value := get $run $name }}
{{- if eq $kind "computed" }}
{{- $pairs = append $pairs (printf "%s=%d" $key (include (printf "fedcifar.run.%s" $name) $root | int)) }}
{{- else if eq $kind "int" }}
{{- $pairs = append $pairs (printf "%s=%d" $key (int $value)) }}
{{- else if eq $kind "float" }}
{{- $pairs = append $pairs (printf "%s=%s" $key (include "fedcifar.tomlFloat" $value)) }}
{{- else if eq $kind "bool" }}
{{- $pairs = append $pairs (printf "%s=%t" $key $value) }}
{{- else }}
{{- $pairs = append $pairs (printf "%s=%s" $key (toJson $value)) }}
{{- end }}
{{- end }}
{{- if not (hasKey $run.extraConfig "out-dir") }}
{{- /* per revision, on the SuperLink's state volume: a Job retry resumes from its checkpoint */}}
{{- $pairs = append $pairs (printf "out-dir=%s" (toJson (printf "%s/runs/revision-%d" (include "fedcifar.stateDir" .) (int .Release.Revision)))) }}
{{- end }}
{{- range $key := keys $run.extraConfig | sortAlpha }}
{{- $pairs = append $pairs (printf "%s=%s" $key (include "fedcifar.tomlValue" (get $run.extraConfig $key))) }}
{{- end }}
{{- join " " $pairs }}
{{- end }}

{{/* The run-config keys fedcifar.runConfig sets from run.* (run.extraConfig may not repeat them), a JSON list. */}}
{{- define "fedcifar.runConfig.builtinKeys" -}}
{{- $keys := list -}}
{{- range $line := splitList "\n" (include "fedcifar.runConfig.keys" .) }}
{{- $keys = append $keys (index (splitList ":" $line) 1) }}
{{- end }}
{{- toJson $keys }}
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
