{{/*
The Deployment of one service. Call with a dict:
  root: the service chart's context
  args: the service's own flags, a YAML list (a string), appended to meshserve.serverArgs
Reads .Values.modelRepository when the chart has one (compute, batcher, ingress) and
.Values.gpu when it has one (compute).
*/}}
{{- define "meshserve.deployment" -}}
{{- $args := .args -}}
{{- with .root -}}
{{- $hasModels := hasKey .Values "modelRepository" -}}
{{- $gpu := and (hasKey .Values "gpu") .Values.gpu.enabled -}}
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
kind: Deployment
metadata:
  name: {{ include "meshserve.fullname" . }}
  labels:
    {{- include "meshserve.labels" . | nindent 4 }}
spec:
  {{- if not .Values.autoscaling.enabled }}
  replicas: {{ .Values.replicas }}
  {{- end }}
  revisionHistoryLimit: {{ .Values.revisionHistoryLimit }}
  {{- with .Values.strategy }}
  strategy:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "meshserve.selectorLabels" . | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "meshserve.labels" . | nindent 8 }}
        {{- with .Values.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with .Values.podAnnotations }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      serviceAccountName: {{ include "meshserve.serviceAccountName" . }}
      automountServiceAccountToken: false
      enableServiceLinks: false
      terminationGracePeriodSeconds: {{ include "meshserve.terminationGracePeriodSeconds" . }}
      {{- with .Values.priorityClassName }}
      priorityClassName: {{ . | quote }}
      {{- end }}
      {{- with .Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml .Values.podSecurityContext | nindent 8 }}
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
          securityContext:
            {{- toYaml .Values.securityContext | nindent 12 }}
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
            {{- with $args }}
            {{- . | trim | nindent 12 }}
            {{- end }}
          ports:
            - name: grpc
              containerPort: {{ .Values.port }}
              protocol: TCP
          env:
            - name: PYTHONUNBUFFERED
              value: "1"
            # The root filesystem is read-only: caches (torch, Python) go to the tmp volume.
            - name: HOME
              value: /tmp
            {{- with .Values.env }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          {{- include "meshserve.probes" . | nindent 10 }}
          {{- if gt (int .Values.preStopSleepSeconds) 0 }}
          lifecycle:
            preStop:
              sleep:
                seconds: {{ .Values.preStopSleepSeconds }}
          {{- end }}
          securityContext:
            {{- toYaml .Values.securityContext | nindent 12 }}
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
      volumes:
        - name: tls
          secret:
            secretName: {{ include "meshserve.tlsSecretName" . }}
            defaultMode: 0440
        - name: tmp
          emptyDir:
            sizeLimit: {{ .Values.tmpSizeLimit }}
        {{- if $hasModels }}
        - name: models
          {{- if .Values.modelRepository.existingClaim }}
          persistentVolumeClaim:
            claimName: {{ .Values.modelRepository.existingClaim }}
            readOnly: true
          {{- else }}
          emptyDir:
            sizeLimit: {{ .Values.modelRepository.sizeLimit }}
          {{- end }}
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
