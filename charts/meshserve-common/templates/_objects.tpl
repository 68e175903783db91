{{/* The objects around the Deployment. Each takes the service chart's context. */}}

{{/*
The Service, port `grpc` (and `metrics`, plain HTTP, when metrics.enabled: on a ClusterIP
Service of its own, <fullname>-metrics, when service.type exposes the Service outside the
cluster). A batcher's carries meshserve.io/model and meshserve.io/version: its
EndpointSlices copy them, which is how the control plane finds batchers in a cluster.
With .Values.statefulSet (the umbrella's compute), the StatefulSet's headless Service, which
gives each replica a DNS name before it is ready.
*/}}
{{- define "meshserve.service" -}}
{{- $headless := hasKey .Values "statefulSet" -}}
{{- $metrics := include "meshserve.metricsEnabled" . -}}
{{- $exposed := and (not $headless) (ne (toString .Values.service.type) "ClusterIP") -}}
apiVersion: v1
kind: Service
metadata:
  {{- if $headless }}
  name: {{ .Values.statefulSet.serviceName }}
  {{- else }}
  name: {{ include "meshserve.fullname" . }}
  {{- end }}
  labels:
    {{- include "meshserve.labels" . | nindent 4 }}
    {{- if eq (include "meshserve.component" .) "batcher" }}
    {{- include "meshserve.modelLabels" . | nindent 4 }}
    {{- end }}
  {{- with .Values.service.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  {{- if $headless }}
  clusterIP: None
  publishNotReadyAddresses: true
  {{- else }}
  type: {{ .Values.service.type }}
  {{- end }}
  selector:
    {{- include "meshserve.selectorLabels" . | nindent 4 }}
  ports:
    - name: grpc
      port: {{ default .Values.port .Values.service.port }}
      targetPort: grpc
      protocol: TCP
      appProtocol: grpc
    {{- if include "meshserve.authEnabled" . }}
    - name: token
      port: {{ .Values.auth.tokenPort }}
      targetPort: token
      protocol: TCP
      appProtocol: grpc
    {{- end }}
    {{- if include "meshserve.httpEnabled" . }}
    - name: http
      port: {{ .Values.http.port }}
      targetPort: http
      protocol: TCP
      appProtocol: https
    {{- end }}
    {{- if and $metrics (not $exposed) }}
    - name: metrics
      port: {{ .Values.metrics.port }}
      targetPort: metrics
      protocol: TCP
      appProtocol: http
    {{- end }}
{{- if and $metrics $exposed }}
---
# The Service above is a {{ .Values.service.type }}: the metrics port gets a ClusterIP Service
# of its own, never exposed outside the cluster.
apiVersion: v1
kind: Service
metadata:
  name: {{ printf "%s-metrics" (include "meshserve.fullname" .) | trunc 63 | trimSuffix "-" }}
  labels:
    {{- include "meshserve.labels" . | nindent 4 }}
spec:
  type: ClusterIP
  selector:
    {{- include "meshserve.selectorLabels" . | nindent 4 }}
  ports:
    - name: metrics
      port: {{ .Values.metrics.port }}
      targetPort: metrics
      protocol: TCP
      appProtocol: http
{{- end }}
{{- end -}}

{{- define "meshserve.serviceAccount" -}}
{{- if .Values.serviceAccount.create -}}
apiVersion: v1
kind: ServiceAccount
metadata:
  name: {{ include "meshserve.serviceAccountName" . }}
  labels:
    {{- include "meshserve.labels" . | nindent 4 }}
  {{- with .Values.serviceAccount.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
# No API token unless a pod asks for one: only the control plane does, to watch
# EndpointSlices (meshserve.endpointSliceRbac).
automountServiceAccountToken: false
{{- end -}}
{{- end -}}

{{/*
minAvailable when set, else maxUnavailable; neither (a block given as `enabled: true` alone,
which replaces the defaults): maxUnavailable 1.
*/}}
{{- define "meshserve.podDisruptionBudget" -}}
{{- if .Values.podDisruptionBudget.enabled -}}
{{- $budget := .Values.podDisruptionBudget -}}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "meshserve.fullname" . }}
  labels:
    {{- include "meshserve.labels" . | nindent 4 }}
spec:
  {{- if not (kindIs "invalid" $budget.minAvailable) }}
  minAvailable: {{ include "meshserve.number" $budget.minAvailable }}
  {{- else if not (kindIs "invalid" $budget.maxUnavailable) }}
  maxUnavailable: {{ include "meshserve.number" $budget.maxUnavailable }}
  {{- else }}
  maxUnavailable: 1
  {{- end }}
  selector:
    matchLabels:
      {{- include "meshserve.selectorLabels" . | nindent 6 }}
{{- end -}}
{{- end -}}

{{- define "meshserve.horizontalPodAutoscaler" -}}
{{- if .Values.autoscaling.enabled -}}
{{- $autoscaling := .Values.autoscaling -}}
{{- if lt (int $autoscaling.maxReplicas) (int $autoscaling.minReplicas) -}}
{{- fail "autoscaling.maxReplicas must be at least autoscaling.minReplicas" -}}
{{- end -}}
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ include "meshserve.fullname" . }}
  labels:
    {{- include "meshserve.labels" . | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ include "meshserve.fullname" . }}
  minReplicas: {{ include "meshserve.number" $autoscaling.minReplicas }}
  maxReplicas: {{ include "meshserve.number" $autoscaling.maxReplicas }}
  metrics:
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ include "meshserve.number" $autoscaling.targetCPUUtilizationPercentage }}
  {{- with $autoscaling.behavior }}
  behavior:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}
{{- end -}}

{{/*
Admits traffic to the port named `grpc` only from pods of the calling components (matched by
app.kubernetes.io/component and app.kubernetes.io/part-of=meshserve, and by
app.kubernetes.io/instance when networkPolicy.callerInstances names the callers' releases:
the umbrella names its own, so that two meshes in one namespace stay apart), in this
namespace or in those that networkPolicy.callerNamespaceSelector picks; from operators' pods
(networkPolicy.operators, the control plane's only: a pod selector and an optional namespace
selector); plus networkPolicy.extraFrom. No callers, operators or extraFrom: any source
(the ingress). With networkPolicy.bls.enabled (the ingress's), a rule of its own admits compute
pods, whose Python models call other models (BLS, --bls-target), to the port named `grpc`
alone: of the releases networkPolicy.bls.callerInstances names, in this namespace or in those
callerNamespaceSelector picks. With metrics.enabled, a rule admits the port named `metrics`
only from metrics.scrapeFrom (a namespaceSelector and/or a podSelector: one peer, both must
match).
*/}}
{{- define "meshserve.networkPolicy" -}}
{{- if .Values.networkPolicy.enabled -}}
{{- $policy := .Values.networkPolicy -}}
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: {{ include "meshserve.fullname" . }}
  labels:
    {{- include "meshserve.labels" . | nindent 4 }}
spec:
  podSelector:
    matchLabels:
      {{- include "meshserve.selectorLabels" . | nindent 6 }}
  policyTypes:
    - Ingress
  ingress:
    - ports:
        - port: grpc
          protocol: TCP
        {{- if include "meshserve.authEnabled" . }}
        - port: token
          protocol: TCP
        {{- end }}
        {{- if include "meshserve.httpEnabled" . }}
        - port: http
          protocol: TCP
        {{- end }}
      {{- $operators := and (hasKey $policy "operators") $policy.operators.enabled -}}
      {{- if or $policy.callers $policy.extraFrom $operators }}
      from:
        {{- range $policy.callers }}
        {{- include "meshserve.callerPeer" (list . $policy.callerInstances $policy.callerNamespaceSelector) | nindent 8 }}
        {{- end }}
        {{- if $operators }}
        - podSelector:
            {{- toYaml $policy.operators.podSelector | nindent 12 }}
          {{- with $policy.operators.namespaceSelector }}
          namespaceSelector:
            {{- toYaml . | nindent 12 }}
          {{- end }}
        {{- end }}
        {{- with $policy.extraFrom }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- end }}
    {{- if and (hasKey $policy "bls") $policy.bls.enabled }}
    - ports:
        - port: grpc
          protocol: TCP
      from:
        {{- include "meshserve.callerPeer" (list "compute" $policy.bls.callerInstances $policy.callerNamespaceSelector) | nindent 8 }}
    {{- end }}
    {{- if include "meshserve.metricsEnabled" . }}
    {{- $peer := dict }}
    {{- range $key, $selector := default (dict) .Values.metrics.scrapeFrom }}
    {{- if not (kindIs "invalid" $selector) }}
    {{- $_ := set $peer $key $selector }}
    {{- end }}
    {{- end }}
    {{- if not $peer }}
    {{- fail "metrics.scrapeFrom needs a namespaceSelector or a podSelector: what may scrape the metrics port (Prometheus' pods)" }}
    {{- end }}
    - ports:
        - port: metrics
          protocol: TCP
      from:
        {{- toYaml (list $peer) | nindent 8 }}
    {{- end }}
{{- end -}}
{{- end -}}

{{/*
One NetworkPolicy peer: the pods of one meshserve component (app.kubernetes.io/component and
app.kubernetes.io/part-of=meshserve), of the releases in instances (app.kubernetes.io/instance;
empty: of any release), in this namespace or in those namespaceSelector picks (empty: this
namespace). Call with (list component instances namespaceSelector).
*/}}
{{- define "meshserve.callerPeer" -}}
{{- $instances := default (list) (index . 1) -}}
- podSelector:
    matchLabels:
      app.kubernetes.io/component: {{ index . 0 | quote }}
      app.kubernetes.io/part-of: meshserve
      {{- if eq (len $instances) 1 }}
      app.kubernetes.io/instance: {{ first $instances | quote }}
      {{- end }}
    {{- if gt (len $instances) 1 }}
    matchExpressions:
      - key: app.kubernetes.io/instance
        operator: In
        values:
          {{- toYaml $instances | nindent 10 }}
    {{- end }}
  {{- with index . 2 }}
  namespaceSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}

{{/*
A Prometheus Operator ServiceMonitor (monitoring.coreos.com/v1) scraping the `metrics` port
of this component's Service(s), selected by their labels: name, instance, component,
part-of. In the umbrella chart that is every Service of the component (one ServiceMonitor
per component; compute and batcher targets get the pods' model and version labels).
*/}}
{{- define "meshserve.serviceMonitor" -}}
{{- if and (hasKey .Values "serviceMonitor") .Values.serviceMonitor.enabled -}}
{{- if not (include "meshserve.metricsEnabled" .) -}}
{{- fail (printf "serviceMonitor.enabled needs metrics.enabled (%s): the ServiceMonitor scrapes the metrics port" (include "meshserve.component" .)) -}}
{{- end -}}
apiVersion: monitoring.coreos.com/v1
kind: ServiceMonitor
metadata:
  name: {{ include "meshserve.fullname" . }}
  labels:
    {{- include "meshserve.labels" . | nindent 4 }}
    {{- with .Values.serviceMonitor.labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  selector:
    matchLabels:
      {{- include "meshserve.baseSelectorLabels" . | nindent 6 }}
  namespaceSelector:
    matchNames:
      - {{ .Release.Namespace }}
  {{- if has (include "meshserve.component" .) (list "compute" "batcher") }}
  podTargetLabels:
    - meshserve.io/model
    - meshserve.io/version
  {{- end }}
  endpoints:
    - port: metrics
      path: /metrics
      scheme: http
      interval: {{ .Values.serviceMonitor.interval }}
{{- end -}}
{{- end -}}

{{/*
A cert-manager Certificate for this service's identity: the DNS SAN its peers verify
(--compute-identity and the like), the Service's names, and the SPIFFE URI that
`meshserve certs` puts in development certificates. Server and client auth: the same
certificate serves and calls the next hop.
*/}}
{{- define "meshserve.certificate" -}}
{{- if .Values.certManager.enabled -}}
{{- $fullname := include "meshserve.fullname" . -}}
{{- $identity := include "meshserve.identity" . -}}
apiVersion: cert-manager.io/v1
kind: Certificate
metadata:
  name: {{ $fullname }}
  labels:
    {{- include "meshserve.labels" . | nindent 4 }}
spec:
  secretName: {{ include "meshserve.tlsSecretName" . }}
  commonName: {{ $identity }}
  dnsNames:
    - {{ $identity }}
    - {{ $fullname }}
    - {{ printf "%s.%s" $fullname .Release.Namespace }}
    - {{ printf "%s.%s.svc" $fullname .Release.Namespace }}
    - {{ printf "%s.%s.svc.%s" $fullname .Release.Namespace .Values.clusterDomain }}
    {{- range .Values.certManager.extraDnsNames }}
    - {{ . }}
    {{- end }}
  uris:
    - {{ printf "spiffe://%s/%s" .Values.certManager.trustDomain $identity }}
  usages:
    - server auth
    - client auth
    - digital signature
  duration: {{ .Values.certManager.duration }}
  renewBefore: {{ .Values.certManager.renewBefore }}
  privateKey:
    algorithm: ECDSA
    size: 256
    rotationPolicy: Always
  issuerRef:
    name: {{ required "certManager.issuerRef.name is required when certManager.enabled" .Values.certManager.issuerRef.name }}
    kind: {{ .Values.certManager.issuerRef.kind }}
    group: {{ .Values.certManager.issuerRef.group }}
{{- end -}}
{{- end -}}


{{/* The control plane's data volume: an existing claim, or the one meshserve.persistentVolumeClaim creates. */}}
{{- define "meshserve.dataClaimName" -}}
{{- default (printf "%s-data" (include "meshserve.fullname" .)) .Values.persistence.existingClaim -}}
{{- end -}}

{{/*
The control plane's store (SQLite): a ReadWriteOnce claim unless persistence.existingClaim
names one. `helm.sh/resource-policy: keep` (persistence.keep): uninstalling the release
leaves the mesh's state (policies, endpoints, audit log) behind.
*/}}
{{- define "meshserve.persistentVolumeClaim" -}}
{{- if not .Values.persistence.existingClaim -}}
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: {{ include "meshserve.dataClaimName" . }}
  labels:
    {{- include "meshserve.labels" . | nindent 4 }}
  {{- if or .Values.persistence.keep .Values.persistence.annotations }}
  annotations:
    {{- if .Values.persistence.keep }}
    helm.sh/resource-policy: keep
    {{- end }}
    {{- with .Values.persistence.annotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- end }}
spec:
  accessModes:
    {{- toYaml .Values.persistence.accessModes | nindent 4 }}
  {{- if .Values.persistence.storageClassName }}
  storageClassName: {{ .Values.persistence.storageClassName | quote }}
  {{- end }}
  resources:
    requests:
      storage: {{ include "meshserve.number" .Values.persistence.size }}
{{- end -}}
{{- end -}}

{{/*
What the control plane may do with the Kubernetes API: get, list and watch EndpointSlices in
the namespace it watches (--kubernetes-namespace), nothing else. Two documents: a Role and
its RoleBinding to the control plane's ServiceAccount.
*/}}
{{- define "meshserve.endpointSliceRbac" -}}
{{- if include "meshserve.watchesEndpointSlices" . -}}
{{- $fullname := include "meshserve.fullname" . -}}
{{- $namespace := include "meshserve.endpointSliceNamespace" . -}}
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: {{ printf "%s-endpointslices" $fullname | trunc 63 | trimSuffix "-" }}
  namespace: {{ $namespace }}
  labels:
    {{- include "meshserve.labels" . | nindent 4 }}
rules:
  - apiGroups:
      - discovery.k8s.io
    resources:
      - endpointslices
    verbs:
      - get
      - list
      - watch
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: {{ printf "%s-endpointslices" $fullname | trunc 63 | trimSuffix "-" }}
  namespace: {{ $namespace }}
  labels:
    {{- include "meshserve.labels" . | nindent 4 }}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: Role
  name: {{ printf "%s-endpointslices" $fullname | trunc 63 | trimSuffix "-" }}
subjects:
  - kind: ServiceAccount
    name: {{ include "meshserve.serviceAccountName" . }}
    namespace: {{ .Release.Namespace }}
{{- end -}}
{{- end -}}
