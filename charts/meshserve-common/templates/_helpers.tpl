{{/*
Names, labels and small values shared by every meshserve service chart. Each template takes
the service chart's root context (`.`); the component is the service chart's name (compute,
batcher, router, ingress), the value the NetworkPolicies of the other charts select on.
*/}}

{{- define "meshserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "meshserve.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The service: compute, batcher, router or ingress. */}}
{{- define "meshserve.component" -}}
{{- .Chart.Name -}}
{{- end -}}

{{- define "meshserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "meshserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: {{ include "meshserve.component" . }}
app.kubernetes.io/part-of: meshserve
{{- end -}}

{{- define "meshserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "meshserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "meshserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "meshserve.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "meshserve.image" -}}
{{- $repository := required "image.repository is required" .Values.image.repository -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" $repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" $repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* The Secret holding tls.crt, tls.key and ca.crt (cert-manager's keys). */}}
{{- define "meshserve.tlsSecretName" -}}
{{- if .Values.certManager.enabled -}}
{{- default (printf "%s-tls" (include "meshserve.fullname" .)) .Values.tls.secretName -}}
{{- else -}}
{{- required "tls.secretName is required unless certManager.enabled: an existing Secret with the keys tls.crt, tls.key and ca.crt" .Values.tls.secretName -}}
{{- end -}}
{{- end -}}

{{/* The name this service's certificate carries; peers verify it (--*-identity flags). */}}
{{- define "meshserve.identity" -}}
{{- default (include "meshserve.component" .) .Values.tls.identity -}}
{{- end -}}

{{/* Seconds Kubernetes waits after SIGTERM: the preStop pause, the drain, and a margin. */}}
{{- define "meshserve.terminationGracePeriodSeconds" -}}
{{- add (int .Values.preStopSleepSeconds) (int (ceil .Values.drainSeconds)) (int .Values.terminationGraceMarginSeconds) -}}
{{- end -}}

{{/*
The flags every service takes (services/common/runtime.py add_server_flags), as a YAML list.
The service chart appends its own.
*/}}
{{- define "meshserve.serverArgs" -}}
- {{ printf "--listen=%s:%v" .Values.listenHost (int .Values.port) | quote }}
- {{ printf "--tls-cert=%s/tls.crt" .Values.tls.mountPath | quote }}
- {{ printf "--tls-key=%s/tls.key" .Values.tls.mountPath | quote }}
- {{ printf "--tls-ca=%s/ca.crt" .Values.tls.mountPath | quote }}
- {{ printf "--drain-seconds=%v" .Values.drainSeconds | quote }}
- {{ printf "--log-level=%s" .Values.logLevel | quote }}
{{- end -}}
