{{/* `meshserve ingress` flags after the shared server flags (services/ingress/service.py). */}}
{{- define "ingress.args" -}}
- {{ printf "--model-repository=%s" .Values.modelRepository.mountPath | quote }}
- {{ printf "--router=%s" (required "router.target is required: HOST:PORT of the router" .Values.router.target) | quote }}
- {{ printf "--router-identity=%s" .Values.router.identity | quote }}
{{- if .Values.requireClientCert }}
- "--require-client-cert"
{{- end }}
{{- end -}}
