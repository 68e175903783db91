{{/*
Each service's own flags, after the shared server flags (meshserve.serverArgs), as a YAML
list: `include "meshserve.args" .` picks the component's. Every flag is one that
`meshserve <component> --help` lists (tests/charts check it).
*/}}
{{- define "meshserve.args" -}}
{{- include (printf "meshserve.args.%s" (include "meshserve.component" .)) . -}}
{{- end -}}

{{/* services/compute/service.py */}}
{{- define "meshserve.args.compute" -}}
{{- $device := toString .Values.device -}}
{{- if and .Values.gpu.enabled (eq $device "cpu") -}}
{{- fail "device: \"cpu\" with gpu.enabled would leave the GPU idle; use auto, cuda or cuda:N" -}}
{{- end -}}
{{- if and (not .Values.gpu.enabled) (hasPrefix "cuda" $device) -}}
{{- fail (printf "device: %q needs gpu.enabled: true (no GPU is requested otherwise)" $device) -}}
{{- end -}}
- {{ printf "--model-repository=%s" .Values.modelRepository.mountPath | quote }}
- {{ printf "--model=%s" (required "model.name is required: the model this compute serves" .Values.model.name) | quote }}
- {{ printf "--version=%v" (required "model.version is required: the version this compute serves" .Values.model.version) | quote }}
- {{ printf "--device=%s" $device | quote }}
- {{ printf "--threads=%v" (int .Values.threads) | quote }}
{{- end -}}

{{/* services/batcher/service.py */}}
{{- define "meshserve.args.batcher" -}}
- {{ printf "--model-repository=%s" .Values.modelRepository.mountPath | quote }}
- {{ printf "--model=%s" (required "model.name is required: the model this batcher serves" .Values.model.name) | quote }}
- {{ printf "--version=%v" (required "model.version is required: the version this batcher serves" .Values.model.version) | quote }}
{{- range (required "compute.targets is required: HOST:PORT of at least one compute" .Values.compute.targets) }}
- {{ printf "--compute=%s" . | quote }}
{{- end }}
- {{ printf "--compute-identity=%s" .Values.compute.identity | quote }}
- {{ printf "--batches-per-replica=%v" (int .Values.batchesPerReplica) | quote }}
{{- end -}}

{{/* services/router/service.py */}}
{{- define "meshserve.args.router" -}}
- {{ printf "--control-plane=%s" (required "controlPlane.target is required: the xDS control plane, HOST:PORT" .Values.controlPlane.target) | quote }}
- {{ printf "--control-plane-identity=%s" .Values.controlPlane.identity | quote }}
- {{ printf "--region=%s" .Values.region | quote }}
- {{ printf "--batcher-identity=%s" .Values.batcherIdentity | quote }}
{{- end -}}

{{/* services/ingress/service.py */}}
{{- define "meshserve.args.ingress" -}}
- {{ printf "--model-repository=%s" .Values.modelRepository.mountPath | quote }}
- {{ printf "--router=%s" (required "router.target is required: HOST:PORT of the router" .Values.router.target) | quote }}
- {{ printf "--router-identity=%s" .Values.router.identity | quote }}
{{- if .Values.requireClientCert }}
- "--require-client-cert"
{{- end }}
{{- if include "meshserve.authEnabled" . }}
{{- $auth := .Values.auth }}
{{- $dir := trimSuffix "/" $auth.mountPath }}
- {{ printf "--token-listen=%s:%v" .Values.listenHost (int $auth.tokenPort) | quote }}
- {{ printf "--policy=%s/policy/%s" $dir $auth.policyKey | quote }}
{{- if $auth.jwksUrl }}
- {{ printf "--jwks=%s" $auth.jwksUrl | quote }}
{{- else }}
- {{ printf "--jwks=%s/jwks/%s" $dir $auth.jwksKey | quote }}
{{- end }}
- {{ printf "--token-issuer=%s" $auth.issuer | quote }}
- {{ printf "--token-audience=%s" $auth.audience | quote }}
- {{ printf "--audit-denied-sample=%v" $auth.auditDeniedSample | quote }}
{{- end }}
{{- end -}}

{{/*
"true" when the chart has auth values and auth.enabled (the ingress); checks that the policy
and the keys are named.
*/}}
{{- define "meshserve.authEnabled" -}}
{{- if and (hasKey .Values "auth") .Values.auth.enabled -}}
{{- if not .Values.auth.policyConfigMap -}}
{{- fail "auth.policyConfigMap is required when auth.enabled: the ConfigMap holding the access policy" -}}
{{- end -}}
{{- if and (not .Values.auth.jwksSecret) (not .Values.auth.jwksUrl) -}}
{{- fail "auth.enabled needs auth.jwksSecret (a Secret holding the JWKS) or auth.jwksUrl" -}}
{{- end -}}
true
{{- end -}}
{{- end -}}

{{/* mesh/service.py: `meshserve control-plane`, its SQLite store on the data volume. */}}
{{- define "meshserve.args.control-plane" -}}
- {{ printf "--store=%s/%s" (trimSuffix "/" .Values.persistence.mountPath) .Values.storeFile | quote }}
- {{ printf "--batcher-identity=%s" .Values.batcherIdentity | quote }}
- {{ printf "--sample-seconds=%v" .Values.sampleSeconds | quote }}
{{- if .Values.endpointSlices.watch }}
- {{ printf "--kubernetes-namespace=%s" (include "meshserve.endpointSliceNamespace" .) | quote }}
{{- end }}
{{- end -}}
