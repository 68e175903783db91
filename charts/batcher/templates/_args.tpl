{{/* `meshserve batcher` flags after the shared server flags (services/batcher/service.py). */}}
{{- define "batcher.args" -}}
- {{ printf "--model-repository=%s" .Values.modelRepository.mountPath | quote }}
- {{ printf "--model=%s" (required "model.name is required: the model this batcher serves" .Values.model.name) | quote }}
- {{ printf "--version=%v" (required "model.version is required: the version this batcher serves" .Values.model.version) | quote }}
{{- range (required "compute.targets is required: HOST:PORT of at least one compute" .Values.compute.targets) }}
- {{ printf "--compute=%s" . | quote }}
{{- end }}
- {{ printf "--compute-identity=%s" .Values.compute.identity | quote }}
- {{ printf "--batches-per-replica=%v" (int .Values.batchesPerReplica) | quote }}
{{- end -}}
