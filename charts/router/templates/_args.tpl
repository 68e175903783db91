{{/* `meshserve router` flags after the shared server flags (services/router/service.py). */}}
{{- define "router.args" -}}
{{- range (required "routes is required: the batcher of at least one model version" .Values.routes) }}
- {{ printf "--route=%s@%v=%s" .model .version .target | quote }}
{{- end }}
{{- range $model, $version := .Values.defaultVersions }}
- {{ printf "--default-version=%s=%v" $model $version | quote }}
{{- end }}
- {{ printf "--batcher-identity=%s" .Values.batcherIdentity | quote }}
{{- end -}}
