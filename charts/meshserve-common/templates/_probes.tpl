{{/*
Probes. Every service serves grpc.health.v1 on its one port, and that port speaks only mutual
TLS: there is deliberately no plaintext port. The kubelet's native gRPC probe speaks plaintext
HTTP/2 and presents no certificate, so it cannot probe it (and a plaintext health port would
break the "no plaintext internal port" rule). One way everywhere, the ingress included: exec
probes that run `meshserve health` over mutual TLS with the pod's own certificate against
localhost. Each succeeds only on SERVING:

- startup: the service is up and ready once (compute: its model loaded and warm);
- readiness: it can serve now (it leaves its Service while draining or while its upstream is
  down);
- liveness: the same check, with a generous failureThreshold, so a wedged event loop or a
  server that stopped answering is restarted, but an upstream outage shorter than
  periodSeconds x failureThreshold is not.
*/}}

{{/* The probe's command: a YAML list. Call with (dict "root" . "probe" "readiness"). */}}
{{- define "meshserve.healthCommand" -}}
{{- $root := .root -}}
{{- $probe := get $root.Values.probes .probe -}}
{{- $tls := $root.Values.tls.mountPath -}}
- "meshserve"
- "health"
- {{ printf "localhost:%v" (int $root.Values.port) | quote }}
- {{ printf "--tls-cert=%s/tls.crt" $tls | quote }}
- {{ printf "--tls-key=%s/tls.key" $tls | quote }}
- {{ printf "--tls-ca=%s/ca.crt" $tls | quote }}
- {{ printf "--identity=%s" (include "meshserve.identity" $root) | quote }}
- {{ printf "--timeout=%d" (sub (int $probe.timeoutSeconds) 1 | max 1) | quote }}
{{- end -}}

{{- define "meshserve.probes" -}}
{{- $root := . -}}
{{- range $name := list "startup" "readiness" "liveness" }}
{{ $name }}Probe:
  exec:
    command:
      {{- include "meshserve.healthCommand" (dict "root" $root "probe" $name) | nindent 6 }}
  {{- with get $root.Values.probes $name }}
  periodSeconds: {{ .periodSeconds }}
  timeoutSeconds: {{ .timeoutSeconds }}
  failureThreshold: {{ .failureThreshold }}
  {{- end }}
{{- end }}
{{- end -}}
