{{/*
Scheduled backups (backup.enabled): a CronJob running `meshserve backup` against the control
plane's store on its data volume (and the registry's model repository), writing a signed
archive to backup.target.existingClaim and keeping the newest backup.keep there; with
backup.upload.image, a second container then copies the archives to an object store.
The data volume is usually ReadWriteOnce: the job's pod is scheduled on the control plane's
node (podAffinity), where both pods may mount it, and reads the SQLite store online.
Takes the control plane's context: the control-plane chart's, or the umbrella's (whose
controlPlane.backup passes through).
*/}}
{{- define "meshserve.backupCronJob" -}}
{{- if and (hasKey .Values "backup") .Values.backup.enabled -}}
{{- $backup := .Values.backup -}}
{{- $data := trimSuffix "/" .Values.persistence.mountPath -}}
{{- $keys := "/etc/meshserve/backup" -}}
{{- $target := trimSuffix "/" $backup.target.mountPath -}}
{{- $registry := include "meshserve.registryEnabled" . -}}
{{- if not (or $backup.target.existingClaim $backup.upload.image) -}}
{{- fail "backup.enabled needs backup.target.existingClaim (a volume the archives are kept on) or backup.upload.image (copies them to an object store)" -}}
{{- end -}}
{{- if not (or $backup.signingKeySecret $registry) -}}
{{- fail "backup.enabled needs a key to sign archives: backup.signingKeySecret, or registry.enabled (its signing key)" -}}
{{- end -}}
{{- $component := printf "%s-backup" (include "meshserve.component" .) -}}
{{- $fullname := include "meshserve.fullname" . -}}
apiVersion: batch/v1
kind: CronJob
metadata:
  name: {{ printf "%s-backup" $fullname | trunc 52 | trimSuffix "-" }}
  labels:
    {{- include "meshserve.labels" . | nindent 4 }}
spec:
  schedule: {{ $backup.schedule | quote }}
  {{- with $backup.timeZone }}
  timeZone: {{ . | quote }}
  {{- end }}
  concurrencyPolicy: Forbid
  startingDeadlineSeconds: {{ include "meshserve.number" $backup.startingDeadlineSeconds }}
  successfulJobsHistoryLimit: {{ include "meshserve.number" $backup.successfulJobsHistoryLimit }}
  failedJobsHistoryLimit: {{ include "meshserve.number" $backup.failedJobsHistoryLimit }}
  jobTemplate:
    spec:
      backoffLimit: {{ include "meshserve.number" $backup.backoffLimit }}
      activeDeadlineSeconds: {{ include "meshserve.number" $backup.activeDeadlineSeconds }}
      template:
        metadata:
          labels:
            # Not the control plane's selector labels: its Service must never pick this pod.
            app.kubernetes.io/name: {{ include "meshserve.name" . }}
            app.kubernetes.io/instance: {{ .Release.Name }}
            app.kubernetes.io/component: {{ $component }}
            app.kubernetes.io/part-of: meshserve
        spec:
          restartPolicy: Never
          serviceAccountName: {{ include "meshserve.serviceAccountName" . }}
          automountServiceAccountToken: false
          enableServiceLinks: false
          {{- with .Values.imagePullSecrets }}
          imagePullSecrets:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          {{- with .Values.podSecurityContext }}
          securityContext:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          affinity:
            podAffinity:
              requiredDuringSchedulingIgnoredDuringExecution:
                - topologyKey: kubernetes.io/hostname
                  labelSelector:
                    matchLabels:
                      {{- include "meshserve.selectorLabels" . | nindent 22 }}
          {{- if $backup.upload.image }}
          initContainers:
          {{- else }}
          containers:
          {{- end }}
            - name: backup
              image: {{ include "meshserve.image" . | quote }}
              imagePullPolicy: {{ .Values.image.pullPolicy }}
              command:
                - meshserve
                - backup
              args:
                - {{ printf "--data-dir=%s" $data | quote }}
                - {{ printf "--store=%s/%s" $data .Values.storeFile | quote }}
                - {{ printf "--out=%s" $target | quote }}
                - {{ printf "--keep=%d" (int $backup.keep) | quote }}
                - {{ printf "--actor=cronjob/%s-backup" $fullname | quote }}
                {{- if $backup.signingKeySecret }}
                - {{ printf "--signing-key=%s/signing/%s" $keys $backup.signingKeyKey | quote }}
                {{- else if .Values.registry.signingKeySecret }}
                - {{ printf "--signing-key=%s/signing/%s" $keys .Values.registry.signingKeyKey | quote }}
                {{- else }}
                - {{ printf "--signing-key=%s/keys/signing.key" $data | quote }}
                {{- end }}
                {{- if $registry }}
                - {{ printf "--model-repository=%s" .Values.registry.modelRepositoryMountPath | quote }}
                {{- end }}
                {{- if $backup.kekSecret }}
                - "--include-keys"
                - {{ printf "--kek-file=%s/kek/%s" $keys $backup.kekKey | quote }}
                {{- end }}
              env:
                - name: PYTHONUNBUFFERED
                  value: "1"
                - name: HOME
                  value: /tmp
              {{- with .Values.securityContext }}
              securityContext:
                {{- toYaml . | nindent 16 }}
              {{- end }}
              resources:
                {{- toYaml $backup.resources | nindent 16 }}
              volumeMounts:
                - name: tmp
                  mountPath: /tmp
                # Read-write: SQLite readers share the write-ahead log's index, and the
                # backup is recorded in the audit log.
                - name: data
                  mountPath: {{ $data | quote }}
                - name: archives
                  mountPath: {{ $target | quote }}
                {{- if $registry }}
                - name: models
                  mountPath: {{ .Values.registry.modelRepositoryMountPath | quote }}
                  readOnly: true
                {{- end }}
                {{- if or $backup.signingKeySecret .Values.registry.signingKeySecret }}
                - name: signing-key
                  mountPath: {{ printf "%s/signing" $keys | quote }}
                  readOnly: true
                {{- end }}
                {{- if $backup.kekSecret }}
                - name: kek
                  mountPath: {{ printf "%s/kek" $keys | quote }}
                  readOnly: true
                {{- end }}
          {{- if $backup.upload.image }}
          containers:
            - name: upload
              image: {{ $backup.upload.image | quote }}
              {{- with $backup.upload.command }}
              command:
                {{- toYaml . | nindent 16 }}
              {{- end }}
              {{- with $backup.upload.args }}
              args:
                {{- toYaml . | nindent 16 }}
              {{- end }}
              env:
                - name: BACKUP_DIR
                  value: {{ $target | quote }}
                - name: HOME
                  value: /tmp
                {{- with $backup.upload.env }}
                {{- toYaml . | nindent 16 }}
                {{- end }}
              {{- with .Values.securityContext }}
              securityContext:
                {{- toYaml . | nindent 16 }}
              {{- end }}
              resources:
                {{- toYaml $backup.resources | nindent 16 }}
              volumeMounts:
                - name: tmp
                  mountPath: /tmp
                - name: archives
                  mountPath: {{ $target | quote }}
                  readOnly: true
          {{- end }}
          volumes:
            - name: tmp
              emptyDir:
                sizeLimit: {{ include "meshserve.number" .Values.tmpSizeLimit }}
            - name: data
              persistentVolumeClaim:
                claimName: {{ include "meshserve.dataClaimName" . }}
            - name: archives
              {{- if $backup.target.existingClaim }}
              persistentVolumeClaim:
                claimName: {{ $backup.target.existingClaim }}
              {{- else }}
              emptyDir:
                sizeLimit: {{ include "meshserve.number" $backup.target.sizeLimit }}
              {{- end }}
            {{- if $registry }}
            - name: models
              persistentVolumeClaim:
                claimName: {{ .Values.registry.modelRepositoryClaim }}
                readOnly: true
            {{- end }}
            {{- if $backup.signingKeySecret }}
            - name: signing-key
              secret:
                secretName: {{ $backup.signingKeySecret }}
                defaultMode: 0440
            {{- else if .Values.registry.signingKeySecret }}
            - name: signing-key
              secret:
                secretName: {{ .Values.registry.signingKeySecret }}
                defaultMode: 0440
            {{- end }}
            {{- if $backup.kekSecret }}
            - name: kek
              secret:
                secretName: {{ $backup.kekSecret }}
                defaultMode: 0440
            {{- end }}
{{- end -}}
{{- end -}}
