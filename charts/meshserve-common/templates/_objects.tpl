{{/* The objects around the Deployment. Each takes the service chart's context. */}}

{{- define "meshserve.service" -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "meshserve.fullname" . }}
  labels:
    {{- include "meshserve.labels" . | nindent 4 }}
  {{- with .Values.service.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  type: {{ .Values.service.type }}
  selector:
    {{- include "meshserve.selectorLabels" . | nindent 4 }}
  ports:
    - name: grpc
      port: {{ default .Values.port .Values.service.port }}
      targetPort: grpc
      protocol: TCP
      appProtocol: grpc
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
# The services never call the Kubernetes API.
automountServiceAccountToken: false
{{- end -}}
{{- end -}}

{{- define "meshserve.podDisruptionBudget" -}}
{{- if .Values.podDisruptionBudget.enabled -}}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "meshserve.fullname" . }}
  labels:
    {{- include "meshserve.labels" . | nindent 4 }}
spec:
  {{- if hasKey .Values.podDisruptionBudget "minAvailable" }}
  minAvailable: {{ .Values.podDisruptionBudget.minAvailable }}
  {{- else }}
  maxUnavailable: {{ .Values.podDisruptionBudget.maxUnavailable }}
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
  minReplicas: {{ $autoscaling.minReplicas }}
  maxReplicas: {{ $autoscaling.maxReplicas }}
  metrics:
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ $autoscaling.targetCPUUtilizationPercentage }}
  {{- with $autoscaling.behavior }}
  behavior:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}
{{- end -}}

{{/*
Admits traffic to the port named `grpc` only from pods of the calling components (matched by
app.kubernetes.io/component and app.kubernetes.io/part-of=meshserve), in this namespace or
in those that networkPolicy.callerNamespaceSelector picks; plus networkPolicy.extraFrom.
No callers and no extraFrom: any source (the ingress).
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
      {{- if or $policy.callers $policy.extraFrom }}
      from:
        {{- range $policy.callers }}
        - podSelector:
            matchLabels:
              app.kubernetes.io/component: {{ . | quote }}
              app.kubernetes.io/part-of: meshserve
          {{- with $policy.callerNamespaceSelector }}
          namespaceSelector:
            {{- toYaml . | nindent 12 }}
          {{- end }}
        {{- end }}
        {{- with $policy.extraFrom }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- end }}
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
