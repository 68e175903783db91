{{/*
The Deployment of one service; takes the chart's context. The container runs
`meshserve <component>` with the shared server flags and the component's own
(meshserve.args). Reads .Values.modelRepository when the chart has one (compute, batcher,
ingress), .Values.gpu (compute), .Values.persistence (control plane: a read-write data volume),
the optional features' volumes and environment (meshserve.featureMounts, featureVolumes,
featureEnv), and .Values.statefulSet when present: the umbrella chart runs each model
version's compute as a StatefulSet, so that every replica has a DNS name its batcher can
name with --compute.
*/}}
{{- define "meshserve.deployment" -}}
{{- with . -}}
{{- include "meshserve.checkPorts" . -}}
{{- $hasModels := hasKey .Values "modelRepository" -}}
{{- $gpu := and (hasKey .Values "gpu") .Values.gpu.enabled -}}
{{- $data := hasKey .Values "persistence" -}}
{{- $statefulSet := hasKey .Values "statefulSet" -}}
{{- $autoscaling := and (hasKey .Values "autoscaling") .Values.autoscaling.enabled -}}
{{- $resources := deepCopy (default (dict) .Values.resources) -}}
{{- $nodeSelector := deepCopy (default (dict) .Values.nodeSelector) -}}
{{- $tolerations := default (list) .Values.tolerations -}}
{{- if and $hasModels .Values.modelRepository.existingClaim .Values.modelRepository.init.command -}}
{{- fail "modelRepository: set existingClaim (mounted read-only) or init.command (fills an emptyDir), not both" -}}
{{- end -}}
{{- if and $hasModels (not .Values.modelRepository.existingClaim) (not .Values.modelRepository.init.command) -}}
{{- fail "modelRepository: set existingClaim (a PVC holding the model repository) or init.command (fills an emptyDir)" -}}
{{- end -}}
{{- if and (gt (int .Values.preStopSleepSeconds) 0) (not (semverCompare ">=1.30.0-0" .Capabilities.KubeVersion.Version)) -}}
{{- fail "preStopSleepSeconds needs Kubernetes >= 1.30 (the preStop sleep action); set it to 0" -}}
{{- end -}}
{{- if $gpu -}}
{{- $limits := default (dict) (get $resources "limits") -}}
{{- $_ := set $limits .Values.gpu.resourceName (int .Values.gpu.count) -}}
{{- $_ := set $resources "limits" $limits -}}
{{- $nodeSelector = mergeOverwrite $nodeSelector (default (dict) .Values.gpu.nodeSelector) -}}
{{- $tolerations = concat $tolerations (default (list) .Values.gpu.tolerations) -}}
{{- end -}}
apiVersion: apps/v1
kind: {{ ternary "StatefulSet" "Deployment" $statefulSet }}
metadata:
  name: {{ include "meshserve.fullname" . }}
  labels:
    {{- include "meshserve.labels" . | nindent 4 }}
spec:
  {{- if not $autoscaling }}
  replicas: {{ include "meshserve.number" .Values.replicas }}
  {{- end }}
  revisionHistoryLimit: {{ include "meshserve.number" .Values.revisionHistoryLimit }}
  {{- if $statefulSet }}
  serviceName: {{ required "statefulSet.serviceName is required" .Values.statefulSet.serviceName }}
  podManagementPolicy: Parallel
  {{- else }}
  {{- with .Values.strategy }}
  strategy:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "meshserve.selectorLabels" . | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "meshserve.labels" . | nindent 8 }}
        {{- with include "meshserve.modelLabels" . }}
        {{- . | nindent 8 }}
        {{- end }}
        {{- with .Values.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with .Values.podAnnotations }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      serviceAccountName: {{ include "meshserve.serviceAccountName" . }}
      {{- if include "meshserve.watchesEndpointSlices" . }}
      # The control plane lists and watches EndpointSlices (its Role allows nothing else).
      automountServiceAccountToken: true
      {{- else }}
      automountServiceAccountToken: false
      {{- end }}
      enableServiceLinks: false
      terminationGracePeriodSeconds: {{ include "meshserve.terminationGracePeriodSeconds" . }}
      {{- with .Values.priorityClassName }}
      priorityClassName: {{ . | quote }}
      {{- end }}
      {{- with .Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.podSecurityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- if and $hasModels .Values.modelRepository.init.command }}
      initContainers:
        - name: fill-model-repository
          image: {{ default (include "meshserve.image" .) .Values.modelRepository.init.image | quote }}
          imagePullPolicy: {{ .Values.image.pullPolicy }}
          command:
            {{- toYaml .Values.modelRepository.init.command | nindent 12 }}
          {{- with .Values.modelRepository.init.args }}
          args:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          env:
            - name: MODEL_REPOSITORY
              value: {{ .Values.modelRepository.mountPath | quote }}
            - name: HOME
              value: /tmp
          {{- with .Values.securityContext }}
          securityContext:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          resources:
            {{- toYaml .Values.modelRepository.init.resources | nindent 12 }}
          volumeMounts:
            - name: models
              mountPath: {{ .Values.modelRepository.mountPath | quote }}
            - name: tmp
              mountPath: /tmp
      {{- end }}
      containers:
        - name: {{ include "meshserve.component" . }}
          image: {{ include "meshserve.image" . | quote }}
          imagePullPolicy: {{ .Values.image.pullPolicy }}
          command:
            - meshserve
            - {{ include "meshserve.component" . }}
          args:
            {{- include "meshserve.serverArgs" . | nindent 12 }}
            {{- include "meshserve.args" . | trim | nindent 12 }}
          ports:
            - name: grpc
              containerPort: {{ .Values.port }}
              protocol: TCP
            {{- if include "meshserve.authEnabled" . }}
            - name: token
              containerPort: {{ .Values.auth.tokenPort }}
              protocol: TCP
            {{- end }}
            {{- if include "meshserve.httpEnabled" . }}
            - name: http
              containerPort: {{ .Values.http.port }}
              protocol: TCP
            {{- end }}
            {{- if include "meshserve.metricsEnabled" . }}
            - name: metrics
              containerPort: {{ .Values.metrics.port }}
              protocol: TCP
            {{- end }}
            - name: health
              containerPort: {{ .Values.probes.port }}
              protocol: TCP
          env:
            - name: PYTHONUNBUFFERED
              value: "1"
            # The root filesystem is read-only: caches (torch, Python) go to the tmp volume.
            - name: HOME
              value: /tmp
            {{- with include "meshserve.featureEnv" . | trim }}
            {{- . | nindent 12 }}
            {{- end }}
            {{- with .Values.env }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          {{- include "meshserve.probes" . | trim | nindent 10 }}
          {{- if gt (int .Values.preStopSleepSeconds) 0 }}
          lifecycle:
            preStop:
              sleep:
                seconds: {{ include "meshserve.number" .Values.preStopSleepSeconds }}
          {{- end }}
          {{- with .Values.securityContext }}
          securityContext:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          resources:
            {{- toYaml $resources | nindent 12 }}
          volumeMounts:
            - name: tls
              mountPath: {{ .Values.tls.mountPath | quote }}
              readOnly: true
            - name: tmp
              mountPath: /tmp
            {{- if $hasModels }}
            - name: models
              mountPath: {{ .Values.modelRepository.mountPath | quote }}
              readOnly: true
            {{- end }}
            {{- if $data }}
            - name: data
              mountPath: {{ .Values.persistence.mountPath | quote }}
            {{- end }}
            {{- if include "meshserve.authEnabled" . }}
            - name: auth-policy
              mountPath: {{ printf "%s/policy" (trimSuffix "/" .Values.auth.mountPath) | quote }}
              readOnly: true
            {{- if .Values.auth.jwksSecret }}
            - name: auth-jwks
              mountPath: {{ printf "%s/jwks" (trimSuffix "/" .Values.auth.mountPath) | quote }}
              readOnly: true
            {{- end }}
            {{- end }}
            {{- with include "meshserve.featureMounts" . | trim }}
            {{- . | nindent 12 }}
            {{- end }}
      volumes:
        - name: tls
          secret:
            secretName: {{ include "meshserve.tlsSecretName" . }}
            defaultMode: 0440
        - name: tmp
          emptyDir:
            sizeLimit: {{ include "meshserve.number" .Values.tmpSizeLimit }}
        {{- if $hasModels }}
        - name: models
          {{- if .Values.modelRepository.existingClaim }}
          persistentVolumeClaim:
            claimName: {{ .Values.modelRepository.existingClaim }}
            readOnly: true
          {{- else }}
          emptyDir:
            sizeLimit: {{ include "meshserve.number" .Values.modelRepository.sizeLimit }}
          {{- end }}
        {{- end }}
        {{- if $data }}
        - name: data
          persistentVolumeClaim:
            claimName: {{ include "meshserve.dataClaimName" . }}
        {{- end }}
        {{- if include "meshserve.authEnabled" . }}
        # Whole volumes, not subPath: the kubelet's updates (policy edits, key rotations)
        # reach the running pod.
        - name: auth-policy
          configMap:
            name: {{ .Values.auth.policyConfigMap }}
        {{- if .Values.auth.jwksSecret }}
        - name: auth-jwks
          secret:
            secretName: {{ .Values.auth.jwksSecret }}
            defaultMode: 0444
        {{- end }}
        {{- end }}
        {{- with include "meshserve.featureVolumes" . | trim }}
        {{- . | nindent 8 }}
        {{- end }}
      {{- with $nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.topologySpreadConstraints }}
      topologySpreadConstraints:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end -}}
{{- end -}}


{{/*
Mounts of the optional features: compute's artifact keys (artifacts), the control plane's
registry (registry), the ingress's asynchronous store (async). Secrets are whole volumes, not
subPath, so that a rotation the kubelet writes reaches the pod.
*/}}
{{- define "meshserve.featureMounts" -}}
{{- if include "meshserve.adminPolicyEnabled" . }}
- name: admin-policy
  mountPath: {{ .Values.policy.mountPath | quote }}
  readOnly: true
{{- end }}
{{- if hasKey .Values "artifacts" }}
{{- $dir := trimSuffix "/" .Values.artifacts.mountPath }}
{{- if .Values.artifacts.trustedSignersSecret }}
- name: artifacts-signers
  mountPath: {{ printf "%s/signers" $dir | quote }}
  readOnly: true
{{- end }}
{{- if .Values.artifacts.kekSecret }}
- name: artifacts-kek
  mountPath: {{ printf "%s/kek" $dir | quote }}
  readOnly: true
{{- end }}
{{- end }}
{{- if include "meshserve.registryEnabled" . }}
{{- $registry := .Values.registry }}
{{- $keys := trimSuffix "/" $registry.keysMountPath }}
- name: registry-models
  mountPath: {{ $registry.modelRepositoryMountPath | quote }}
{{- if $registry.signingKeySecret }}
- name: registry-signing
  mountPath: {{ printf "%s/signing" $keys | quote }}
  readOnly: true
{{- end }}
{{- if $registry.kekSecret }}
- name: registry-kek
  mountPath: {{ printf "%s/kek" $keys | quote }}
  readOnly: true
{{- end }}
{{- end }}
{{- if include "meshserve.asyncEnabled" . }}
- name: async
  mountPath: {{ .Values.async.mountPath | quote }}
{{- end }}
{{- end -}}

{{- define "meshserve.featureVolumes" -}}
{{- if include "meshserve.adminPolicyEnabled" . }}
- name: admin-policy
  configMap:
    name: {{ .Values.policy.configMap }}
{{- end }}
{{- if hasKey .Values "artifacts" }}
{{- if .Values.artifacts.trustedSignersSecret }}
- name: artifacts-signers
  secret:
    secretName: {{ .Values.artifacts.trustedSignersSecret }}
    defaultMode: 0444
{{- end }}
{{- if .Values.artifacts.kekSecret }}
- name: artifacts-kek
  secret:
    secretName: {{ .Values.artifacts.kekSecret }}
    defaultMode: 0440
{{- end }}
{{- end }}
{{- if include "meshserve.registryEnabled" . }}
{{- $registry := .Values.registry }}
- name: registry-models
  persistentVolumeClaim:
    claimName: {{ $registry.modelRepositoryClaim }}
{{- if $registry.signingKeySecret }}
- name: registry-signing
  secret:
    secretName: {{ $registry.signingKeySecret }}
    defaultMode: 0440
{{- end }}
{{- if $registry.kekSecret }}
- name: registry-kek
  secret:
    secretName: {{ $registry.kekSecret }}
    defaultMode: 0440
{{- end }}
{{- end }}
{{- if include "meshserve.asyncEnabled" . }}
- name: async
{{- if .Values.async.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ .Values.async.existingClaim }}
{{- else }}
  # An emptyDir: accepted requests and finished results are lost with the pod.
  emptyDir:
    sizeLimit: {{ include "meshserve.number" .Values.async.sizeLimit }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Environment of the optional features: the batcher's Redis password, from a Secret. */}}
{{- define "meshserve.featureEnv" -}}
{{- if and (hasKey .Values "cache") .Values.cache.redis.passwordSecret }}
- name: MESHSERVE_BATCHER_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.cache.redis.passwordSecret }}
      key: {{ .Values.cache.redis.passwordKey }}
{{- end }}
{{- end -}}


{{/*
Fails when two of the pod's listeners (grpc, token, http, metrics, health) are given one port:
the manifests would be valid, and the process would die with "Address already in use".
*/}}
{{- define "meshserve.checkPorts" -}}
{{- $ports := list (list "port" .Values.port) -}}
{{- if include "meshserve.authEnabled" . -}}
{{- $ports = append $ports (list "auth.tokenPort" .Values.auth.tokenPort) -}}
{{- end -}}
{{- if include "meshserve.httpEnabled" . -}}
{{- $ports = append $ports (list "http.port" .Values.http.port) -}}
{{- end -}}
{{- if include "meshserve.metricsEnabled" . -}}
{{- $ports = append $ports (list "metrics.port" .Values.metrics.port) -}}
{{- end -}}
{{- $ports = append $ports (list "probes.port" .Values.probes.port) -}}
{{- $seen := dict -}}
{{- range $entry := $ports -}}
{{- $number := include "meshserve.number" (index $entry 1) -}}
{{- if hasKey $seen $number -}}
{{- fail (printf "%s: %s (%s) and %s (%s) are the same port: each listener needs a port of its own" (include "meshserve.component" $) (get $seen $number) $number (index $entry 0) $number) -}}
{{- end -}}
{{- $_ := set $seen $number (index $entry 0) -}}
{{- end -}}
{{- end -}}
