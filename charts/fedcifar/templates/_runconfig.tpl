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

{{/* The Flower run config: every run.* value as its kebab-case key, then run.extraConfig (sorted). */}}
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

{{/* The run-config keys fedcifar.runConfig sets from run.* (run.extraConfig may not repeat them), a JSON list. */}}
{{- define "fedcifar.runConfig.builtinKeys" -}}
{{- list "num-server-rounds" "local-epochs" "batch-size" "learning-rate" "momentum" "partitioner" "dirichlet-alpha" "fraction-train" "fraction-evaluate" "min-nodes" "num-partitions" "round-timeout" "seed" "device" "round-retries" "resume" "strategy" "trim-beta" "num-malicious-nodes" "num-nodes-to-select" "max-examples" "proximal-mu" "eta" "server-momentum" "dp" "noise-multiplier" "clipping-norm" "dp-delta" | toJson }}
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
