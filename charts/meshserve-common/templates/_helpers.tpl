{{/*
Names, labels and small values shared by every meshserve chart. Each template takes a
chart's root context (`.`), or, in the umbrella chart `meshserve`, a context it builds per
component (its Values carry `component`). The component (compute, batcher, router, ingress,
control-plane) is the service chart's name; the NetworkPolicies of the other charts select
on it.
*/}}

{{- define "meshserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The name of the service's objects, its Service's included: a DNS-1035 label, which Helm's
release names (dots, a leading digit) need not be. Refused at render rather than by the API
server half-way through an install.
*/}}
{{- define "meshserve.fullname" -}}
{{- $fullname := "" -}}
{{- if .Values.fullnameOverride -}}
{{- $fullname = .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- $fullname = .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $fullname = printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- if not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $fullname) -}}
{{- $override := ternary "" " (or set fullnameOverride)" (hasKey .Values "component") -}}
{{- fail (printf "release name %q gives the Service name %q, which is not a DNS-1035 label (lower-case letters, digits and '-', starting with a letter, at most 63): choose a release name that starts with a letter and has no dots%s" .Release.Name $fullname $override) -}}
{{- end -}}
{{- $fullname -}}
{{- end -}}

{{/* The service: compute, batcher, router, ingress or control-plane. */}}
{{- define "meshserve.component" -}}
{{- if hasKey .Values "component" -}}
{{- .Values.component -}}
{{- else -}}
{{- .Chart.Name -}}
{{- end -}}
{{- end -}}

{{/*
The model version a compute or batcher serves, as labels (nothing for the other services).
On pods and selectors: one release of the umbrella chart runs many model versions, and
Istio subsets (mesh/istio.py) select batcher pods by them. On a Service's metadata only for
the batcher: EndpointSlices copy their Service's labels, and the control plane registers
every slice that carries them (mesh/endpointslices.py).
*/}}
{{- define "meshserve.modelLabels" -}}
{{- if hasKey .Values "model" -}}
meshserve.io/model: {{ .Values.model.name | quote }}
meshserve.io/version: {{ include "meshserve.number" .Values.model.version | quote }}
{{- end -}}
{{- end -}}

{{/*
A value as text: a string as it is, a number without an exponent. YAML and JSON numbers reach
templates as float64, which `toString`, `%v` and `{{ . }}` print as 1e+06 from 1,000,000 up:
a model version of 20261206 would become the label "2.0261206e+07". Integral numbers print
as integers, others in plain decimal.
*/}}
{{- define "meshserve.number" -}}
{{- if kindIs "float64" . -}}
{{- if eq . (floor .) -}}
{{- printf "%d" (int64 .) -}}
{{- else if contains "e" (printf "%v" .) -}}
{{- regexReplaceAll "0+$" (printf "%f" .) "" | trimSuffix "." -}}
{{- else -}}
{{- printf "%v" . -}}
{{- end -}}
{{- else -}}
{{- toString . -}}
{{- end -}}
{{- end -}}

{{- define "meshserve.baseSelectorLabels" -}}
app.kubernetes.io/name: {{ include "meshserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: {{ include "meshserve.component" . }}
app.kubernetes.io/part-of: meshserve
{{- end -}}

{{- define "meshserve.selectorLabels" -}}
{{ include "meshserve.baseSelectorLabels" . }}
{{- with include "meshserve.modelLabels" . }}
{{ . }}
{{- end }}
{{- end -}}

{{/* Labels of every object's metadata (no model labels: see meshserve.modelLabels). */}}
{{- define "meshserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "meshserve.baseSelectorLabels" . }}
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
- {{ printf "--drain-seconds=%s" (include "meshserve.number" .Values.drainSeconds) | quote }}
- {{ printf "--log-level=%s" .Values.logLevel | quote }}
- {{ printf "--health-listen=%s:%v" .Values.listenHost (int .Values.probes.port) | quote }}
{{- if include "meshserve.metricsEnabled" . }}
- {{ printf "--metrics-listen=%s:%v" .Values.listenHost (int .Values.metrics.port) | quote }}
{{- end }}
{{- end -}}

{{/*
Prometheus metrics (--metrics-listen): plain HTTP `/metrics` on the port named `metrics`,
admitted by the NetworkPolicy only from metrics.scrapeFrom. "true" when on, "" when off.
*/}}
{{- define "meshserve.metricsEnabled" -}}
{{- if and (hasKey .Values "metrics") .Values.metrics.enabled -}}
true
{{- end -}}
{{- end -}}

{{/* The control plane watches batchers' EndpointSlices (and needs an API token) when on. */}}
{{- define "meshserve.watchesEndpointSlices" -}}
{{- if and (hasKey .Values "endpointSlices") .Values.endpointSlices.watch -}}
true
{{- end -}}
{{- end -}}

{{- define "meshserve.endpointSliceNamespace" -}}
{{- default .Release.Namespace .Values.endpointSlices.namespace -}}
{{- end -}}
