{{/*
The release's alerting rules, one source rendered two ways: a PrometheusRule (prometheusrule.yaml,
where monitoring.coreos.com/v1 exists) and a plain rule file in a ConfigMap (alerts-configmap.yaml).
Rules about the SuperLink's side ship with a release that runs the SuperLink, rules about SuperNodes
with a release that runs clients. Every expression selects this release's own series by the labels
`namespace` and `release` (the pod label app.kubernetes.io/instance: the chart's ServiceMonitor and
PodMonitor add it; README "Alerts" shows the relabelling for a Prometheus of one's own). Conventions
of kubernetes-mixin: alerts on symptoms, `for:` that rides out a blip, severity warning or critical,
a runbook link on every alert (README, "Alerts").
*/}}
{{- define "fedcifar.alerts.groups" -}}
{{- $a := .Values.alerts }}
{{- $sel := printf "namespace=%q, release=%q" .Release.Namespace .Release.Name }}
{{- $runbook := $a.runbookUrl }}
{{- $release := .Release.Name }}
{{- if include "fedcifar.runsSuperLink" . }}
{{- $step := add (mul 2 (int (float64 .Values.run.roundTimeout))) (int $a.runStalled.marginSeconds) }}
- name: fedcifar-superlink
  rules:
    - alert: FedcifarSuperLinkDown
      expr: >-
        fedcifar_superlink_run_list_up{ {{- $sel }}} == 0
        or absent(fedcifar_superlink_run_list_up{ {{- $sel }}})
      for: {{ $a.superlinkDown.for }}
      labels:
        severity: critical
      annotations:
        summary: The SuperLink of release {{ $release }} is down or gone.
        description: >-
          No scrape of release {{ $release }}'s SuperLink (namespace {{ .Release.Namespace }}) found its run
          list answering for {{ $a.superlinkDown.for }}: the pod is gone, its metrics endpoint is not scraped,
          or Flower's SuperLink does not answer. No round can run.
        runbook_url: {{ printf "%s#fedcifarsuperlinkdown" $runbook }}
    - alert: FedcifarRunNotStarting
      expr: >-
        (time() - fedcifar_run_status_since_timestamp_seconds{ {{- $sel }}}) > {{ $a.runNotStarting.seconds }}
        and on (namespace, release, run_id)
        fedcifar_run_info{ {{- $sel }}, status=~"pending|starting"} == 1
      for: {{ $a.runNotStarting.for }}
      labels:
        severity: warning
      annotations:
        summary: 'Run {{ "{{ $labels.run_id }}" }} of release {{ $release }} has not started for {{ $a.runNotStarting.seconds }}s.'
        description: >-
          Run {{ "{{ $labels.run_id }}" }} of release {{ $release }} has been pending or starting for
          more than {{ $a.runNotStarting.seconds }} seconds: its ServerApp never started.
        runbook_url: {{ printf "%s#fedcifarrunnotstarting" $runbook }}
    - alert: FedcifarRunStalled
      expr: >-
        (time() - fedcifar_run_status_since_timestamp_seconds{ {{- $sel }}}) > {{ $step }}
        and on (namespace, release, run_id)
        fedcifar_run_info{ {{- $sel }}, status="running"} == 1
        and on (namespace, release)
        (time() - fedcifar_run_progress_timestamp_seconds{ {{- $sel }}}) > {{ $step }}
      for: {{ $a.runStalled.for }}
      labels:
        severity: critical
      annotations:
        summary: 'Run {{ "{{ $labels.run_id }}" }} of release {{ $release }} has stalled.'
        description: >-
          Run {{ "{{ $labels.run_id }}" }} of release {{ $release }} is running but its ServerApp has
          made no progress (no training attempt or evaluation begun, no round completed) for more than
          {{ $step }} seconds, the bound of one step (twice round-timeout plus
          {{ $a.runStalled.marginSeconds }}s): it hangs or died while the SuperLink stays up.
        runbook_url: {{ printf "%s#fedcifarrunstalled" $runbook }}
    - alert: FedcifarRunFailed
      expr: >-
        fedcifar_run_info{ {{- $sel }}, status="finished", sub_status="failed"} == 1
        and on (namespace, release, run_id)
        (time() - fedcifar_run_status_since_timestamp_seconds{ {{- $sel }}}) < {{ $a.runFailed.seconds }}
      labels:
        severity: critical
      annotations:
        summary: 'Run {{ "{{ $labels.run_id }}" }} of release {{ $release }} failed.'
        description: >-
          Run {{ "{{ $labels.run_id }}" }} of release {{ $release }} finished as failed (Flower's
          status); its completed rounds are checkpointed.
        runbook_url: {{ printf "%s#fedcifarrunfailed" $runbook }}
    - alert: FedcifarSlotSilent
      expr: >-
        fedcifar_slot_rounds_since_accepted{ {{- $sel }}} >= {{ $a.slotSilent.rounds }}
        and on (namespace, release)
        count by (namespace, release) (fedcifar_run_info{ {{- $sel }}, status="running"} == 1)
      for: {{ $a.slotSilent.for }}
      labels:
        severity: warning
      annotations:
        summary: 'Slot {{ "{{ $labels.partition }}" }} (site {{ "{{ $labels.site }}" }}) of release {{ $release }} sent no accepted reply for {{ $a.slotSilent.rounds }} rounds.'
        description: >-
          Slot {{ "{{ $labels.partition }}" }} of site {{ "{{ $labels.site }}" }} (release {{ $release }})
          has had no training reply aggregated for {{ "{{ $value }}" }} rounds: its node is down,
          late, failing or refused.
        runbook_url: {{ printf "%s#fedcifarslotsilent" $runbook }}
    - alert: FedcifarRepliesRefused
      expr: >-
        sum by (namespace, release, site, partition, reason)
        (increase(fedcifar_rejected_updates_total{ {{- $sel }}}[{{ $a.refusals.window }}])) > 0
      for: {{ $a.refusals.for }}
      labels:
        severity: warning
      annotations:
        summary: 'Replies of slot {{ "{{ $labels.partition }}" }} (site {{ "{{ $labels.site }}" }}) were refused: {{ "{{ $labels.reason }}" }}.'
        description: >-
          Release {{ $release }} refused {{ "{{ $value | humanize }}" }} replies claiming slot
          {{ "{{ $labels.partition }}" }} of site {{ "{{ $labels.site }}" }} in the last
          {{ $a.refusals.window }} ({{ "{{ $labels.reason }}" }}); none reached the model.
        runbook_url: {{ printf "%s#fedcifarrepliesrefused" $runbook }}
    - alert: FedcifarFleetRequestsRefused
      expr: >-
        sum by (namespace, release, site, reason)
        (increase(fedcifar_fleet_refused_total{ {{- $sel }}}[{{ $a.refusals.window }}])) > 0
      for: {{ $a.refusals.for }}
      labels:
        severity: warning
      annotations:
        summary: 'The Fleet guard of release {{ $release }} refused requests of site {{ "{{ $labels.site }}" }}: {{ "{{ $labels.reason }}" }}.'
        description: >-
          A node of site {{ "{{ $labels.site }}" }} sent {{ "{{ $value | humanize }}" }} Fleet requests
          in the last {{ $a.refusals.window }} that release {{ $release }}'s Fleet guard refused
          ({{ "{{ $labels.reason }}" }}): it acted for another node, or beyond its budgets.
        runbook_url: {{ printf "%s#fedcifarfleetrequestsrefused" $runbook }}
    - alert: FedcifarClientFailures
      expr: >-
        sum by (namespace, release, site, partition)
        (increase(fedcifar_client_failures_total{ {{- $sel }}}[{{ $a.clientFailures.window }}])) > {{ $a.clientFailures.threshold }}
      for: {{ $a.clientFailures.for }}
      labels:
        severity: warning
      annotations:
        summary: 'Slot {{ "{{ $labels.partition }}" }} (site {{ "{{ $labels.site }}" }}) of release {{ $release }} is failing.'
        description: >-
          Slot {{ "{{ $labels.partition }}" }} of site {{ "{{ $labels.site }}" }} (release {{ $release }})
          missed its deadline or answered with an error {{ "{{ $value | humanize }}" }} times in the last
          {{ $a.clientFailures.window }}, above {{ $a.clientFailures.threshold }}.
        runbook_url: {{ printf "%s#fedcifarclientfailures" $runbook }}
    - alert: FedcifarPrivacyBudgetNearlySpent
      expr: >-
        fedcifar_dp_epsilon{ {{- $sel }}} >= {{ $a.privacyBudget.warnFraction }} * fedcifar_dp_max_epsilon{ {{- $sel }}}
        and fedcifar_dp_max_epsilon{ {{- $sel }}} > 0
      for: {{ $a.privacyBudget.for }}
      labels:
        severity: warning
      annotations:
        summary: 'The run of release {{ $release }} has spent epsilon {{ "{{ $value | humanize }}" }}, {{ $a.privacyBudget.warnFraction }} of its budget or more.'
        description: >-
          Under central DP the run of release {{ $release }} has spent epsilon {{ "{{ $value | humanize }}" }},
          at least {{ $a.privacyBudget.warnFraction }} of its max-epsilon: a few more rounds and it stops.
        runbook_url: {{ printf "%s#fedcifarprivacybudgetnearlyspent" $runbook }}
    - alert: FedcifarRunStoppedAtPrivacyBudget
      expr: >-
        increase(fedcifar_runs_stopped_early_total{ {{- $sel }}, reason="privacy_budget"}[{{ $a.privacyBudget.window }}]) > 0
      labels:
        severity: warning
      annotations:
        summary: A run of release {{ $release }} stopped at its privacy budget.
        description: >-
          A run of release {{ $release }} ended before num-server-rounds: its next round would have
          spent more than max-epsilon (history.json, "stopped").
        runbook_url: {{ printf "%s#fedcifarrunstoppedatprivacybudget" $runbook }}
{{- end }}
{{- if include "fedcifar.runsClients" . }}
- name: fedcifar-supernodes
  rules:
    - alert: FedcifarGpuUnused
      expr: fedcifar_client_info{ {{- $sel }}, gpu_requested="true", device="cpu"} == 1
      for: {{ $a.gpuUnused.for }}
      labels:
        severity: warning
      annotations:
        summary: 'Slot {{ "{{ $labels.partition }}" }} (site {{ "{{ $labels.site }}" }}) was given a GPU but trains on the CPU.'
        description: >-
          The SuperNode of slot {{ "{{ $labels.partition }}" }} of site {{ "{{ $labels.site }}" }}
          (release {{ $release }}, pod {{ "{{ $labels.pod }}" }}) requested a GPU but sees no CUDA device:
          it trains on the CPU, many times slower.
        runbook_url: {{ printf "%s#fedcifargpuunused" $runbook }}
{{- end }}
{{- end }}
