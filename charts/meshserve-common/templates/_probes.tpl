{{/*
Probes. The serving port speaks only mutual TLS, which the kubelet's native probes cannot, so
every service also answers plain-HTTP `/readyz` and `/livez` on a port of its own
(--health-listen, the container port named `health`, probes.port). It carries health and
nothing else: no Service exposes it and no NetworkPolicy rule admits it (the kubelet probes
from the node, which NetworkPolicy implementations admit). Each probe is an httpGet:

- startup: `/readyz`, until the service is ready once (compute: its model loaded and warm);
- readiness: `/readyz`, the service's grpc.health.v1 status: it leaves its Service while
  draining or while its upstream is down;
- liveness: `/livez`, the event loop's heartbeat: a wedged or stopped process is restarted,
  one whose upstream is down is not (a restart would not bring the upstream back).
*/}}
{{- define "meshserve.probes" -}}
{{- $root := . -}}
{{- range $name := list "startup" "readiness" "liveness" }}
{{ $name }}Probe:
  httpGet:
    path: {{ ternary "/livez" "/readyz" (eq $name "liveness") }}
    port: health
  {{- with get $root.Values.probes $name }}
  periodSeconds: {{ include "meshserve.number" .periodSeconds }}
  timeoutSeconds: {{ include "meshserve.number" .timeoutSeconds }}
  failureThreshold: {{ include "meshserve.number" .failureThreshold }}
  {{- end }}
{{- end }}
{{- end -}}
