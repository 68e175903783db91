{{/* `meshserve router` flags after the shared server flags (services/router/service.py). */}}
{{- define "router.args" -}}
- {{ printf "--control-plane=%s" (required "controlPlane.target is required: the xDS control plane, HOST:PORT" .Values.controlPlane.target) | quote }}
- {{ printf "--control-plane-identity=%s" .Values.controlPlane.identity | quote }}
- {{ printf "--region=%s" .Values.region | quote }}
- {{ printf "--batcher-identity=%s" .Values.batcherIdentity | quote }}
{{- end -}}
