{{/*
Probes. Every service serves grpc.health.v1 on its one port, but only over TLS, and the
internal services require a client certificate. The kubelet's native gRPC probe speaks
plaintext HTTP/2 and can present no certificate, so it cannot probe that port. Instead:

- startup and liveness: a TCP connect to the port named `grpc` (the process is up and its
  server accepts connections);
- readiness: by default an exec probe that runs the image's Python with meshserve's own
  generated health stubs, over mutual TLS with the pod's own certificate, and succeeds only
  on SERVING (compute is SERVING only once its model is loaded and warm). With
  probes.readiness.grpcHealth=false readiness is the same TCP check as liveness.

Arguments of the script: ADDRESS IDENTITY TLS_DIR TIMEOUT_SECONDS.
*/}}
{{- define "meshserve.healthCheckScript" -}}
import sys
import grpc
from meshserve.protocol import health_pb2, health_pb2_grpc
address, identity, tls_dir, timeout = sys.argv[1:5]
def read(name):
    with open(f"{tls_dir}/{name}", "rb") as file:
        return file.read()
credentials = grpc.ssl_channel_credentials(read("ca.crt"), read("tls.key"), read("tls.crt"))
options = [("grpc.ssl_target_name_override", identity)]
with grpc.secure_channel(address, credentials, options=options) as channel:
    reply = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(), timeout=float(timeout))
serving = reply.status == health_pb2.HealthCheckResponse.SERVING
print(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
sys.exit(0 if serving else 1)
{{- end -}}

{{- define "meshserve.probes" -}}
{{- $probes := .Values.probes -}}
startupProbe:
  tcpSocket:
    port: grpc
  periodSeconds: {{ $probes.startup.periodSeconds }}
  timeoutSeconds: {{ $probes.startup.timeoutSeconds }}
  failureThreshold: {{ $probes.startup.failureThreshold }}
readinessProbe:
  {{- if $probes.readiness.grpcHealth }}
  exec:
    command:
      - {{ $probes.python | quote }}
      - "-c"
      - {{ include "meshserve.healthCheckScript" . | toJson }}
      - {{ printf "localhost:%v" (int .Values.port) | quote }}
      - {{ include "meshserve.identity" . | quote }}
      - {{ .Values.tls.mountPath | quote }}
      - {{ sub (int $probes.readiness.timeoutSeconds) 1 | max 1 | quote }}
  {{- else }}
  tcpSocket:
    port: grpc
  {{- end }}
  periodSeconds: {{ $probes.readiness.periodSeconds }}
  timeoutSeconds: {{ $probes.readiness.timeoutSeconds }}
  failureThreshold: {{ $probes.readiness.failureThreshold }}
livenessProbe:
  tcpSocket:
    port: grpc
  periodSeconds: {{ $probes.liveness.periodSeconds }}
  timeoutSeconds: {{ $probes.liveness.timeoutSeconds }}
  failureThreshold: {{ $probes.liveness.failureThreshold }}
{{- end -}}
