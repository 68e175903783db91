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
- {{ printf "--version=%s" (include "meshserve.number" (required "model.version is required: the version this compute serves" .Values.model.version)) | quote }}
- {{ printf "--device=%s" $device | quote }}
- {{ printf "--threads=%v" (int .Values.threads) | quote }}
{{- include "meshserve.args.allowCallers" . }}
{{- if hasKey .Values "artifacts" }}
{{- $artifacts := .Values.artifacts }}
{{- $dir := trimSuffix "/" $artifacts.mountPath }}
{{- if and $artifacts.requireSigned (not $artifacts.trustedSignersSecret) -}}
{{- fail "artifacts.requireSigned needs artifacts.trustedSignersSecret: a Secret of the trusted signers' public keys (<name>.pub, PEM)" -}}
{{- end }}
{{- if $artifacts.trustedSignersSecret }}
- {{ printf "--trusted-signers=%s/signers" $dir | quote }}
{{- end }}
{{- if $artifacts.requireSigned }}
- "--require-signed"
{{- end }}
{{- if $artifacts.kekSecret }}
- {{ printf "--kek-file=%s/kek/%s" $dir $artifacts.kekKey | quote }}
{{- end }}
{{- end }}
{{- if and (hasKey .Values "bls") .Values.bls.target }}
- {{ printf "--bls-target=%s" .Values.bls.target | quote }}
{{- end }}
{{- end -}}

{{/* services/batcher/service.py */}}
{{- define "meshserve.args.batcher" -}}
- {{ printf "--model-repository=%s" .Values.modelRepository.mountPath | quote }}
- {{ printf "--model=%s" (required "model.name is required: the model this batcher serves" .Values.model.name) | quote }}
- {{ printf "--version=%s" (include "meshserve.number" (required "model.version is required: the version this batcher serves" .Values.model.version)) | quote }}
{{- range (required "compute.targets is required: HOST:PORT of at least one compute" .Values.compute.targets) }}
- {{ printf "--compute=%s" . | quote }}
{{- end }}
- {{ printf "--compute-identity=%s" .Values.compute.identity | quote }}
- {{ printf "--batches-per-replica=%v" (int .Values.batchesPerReplica) | quote }}
{{- include "meshserve.args.allowCallers" . }}
{{- if hasKey .Values "overload" }}
{{- include "meshserve.args.whenSetInt" (list "--max-queue-bytes" .Values.overload.maxQueueBytes) }}
{{- end }}
{{- if hasKey .Values "failover" }}
{{- include "meshserve.args.whenSet" (list "--stall-timeout" .Values.failover.stallTimeoutSeconds) }}
{{- include "meshserve.args.whenSetInt" (list "--eject-after" .Values.failover.ejectAfter) }}
{{- include "meshserve.args.whenSet" (list "--ejection-seconds" .Values.failover.ejectionSeconds) }}
{{- end }}
{{- if hasKey .Values "cache" }}
{{- $cache := .Values.cache }}
{{- include "meshserve.args.whenSetInt" (list "--cache-bytes" $cache.bytes) }}
{{- if $cache.redis.url }}
{{- if or (regexMatch "^[a-z]+://[^/@]*:[^/@]*@" $cache.redis.url) (regexMatch "[?&]password=" $cache.redis.url) -}}
{{- fail "cache.redis.url must not carry a password (it would be on the command line): put it in the Secret named by cache.redis.passwordSecret" -}}
{{- end }}
- {{ printf "--cache-redis=%s" $cache.redis.url | quote }}
{{- include "meshserve.args.whenSetInt" (list "--cache-ttl" $cache.redis.ttlSeconds) }}
{{- else if $cache.redis.passwordSecret -}}
{{- fail "cache.redis.passwordSecret needs cache.redis.url: the Redis the password is for" -}}
{{- end }}
{{- end }}
{{- end -}}

{{/* services/router/service.py */}}
{{- define "meshserve.args.router" -}}
- {{ printf "--control-plane=%s" (required "controlPlane.target is required: the xDS control plane, HOST:PORT" .Values.controlPlane.target) | quote }}
- {{ printf "--control-plane-identity=%s" .Values.controlPlane.identity | quote }}
- {{ printf "--region=%s" .Values.region | quote }}
- {{ printf "--batcher-identity=%s" .Values.batcherIdentity | quote }}
{{- include "meshserve.args.allowCallers" . }}
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
- {{ printf "--audit-denied-sample=%s" (include "meshserve.number" $auth.auditDeniedSample) | quote }}
{{- end }}
{{- if hasKey .Values "maxInflightBytes" }}
{{- include "meshserve.args.whenSetInt" (list "--max-inflight-bytes" .Values.maxInflightBytes) }}
{{- end }}
{{- if hasKey .Values "groupLingerMs" }}
{{- include "meshserve.args.whenSet" (list "--group-linger-ms" .Values.groupLingerMs) }}
{{- end }}
{{- if include "meshserve.httpEnabled" . }}
- {{ printf "--http-listen=%s:%v" .Values.listenHost (int .Values.http.port) | quote }}
{{- include "meshserve.args.whenSetInt" (list "--http-max-body-bytes" .Values.http.maxBodyBytes) }}
{{- end }}
{{- if and (hasKey .Values "audit") .Values.audit.controlPlane.target }}
- {{ printf "--control-plane=%s" .Values.audit.controlPlane.target | quote }}
{{- end }}
{{- if hasKey .Values "readiness" }}
- {{ printf "--readiness=%s" .Values.readiness | quote }}
{{- end }}
{{- if include "meshserve.asyncEnabled" . }}
{{- $async := .Values.async }}
- {{ printf "--async-store=%s/%s" (trimSuffix "/" $async.mountPath) $async.storeFile | quote }}
{{- include "meshserve.args.whenSetInt" (list "--async-concurrency" $async.concurrency) }}
{{- include "meshserve.args.whenSetInt" (list "--async-max-pending" $async.maxPending) }}
{{- end }}
{{- end -}}

{{/*
"true" when the chart has async values and async.enabled (the ingress): the asynchronous API
(Submit/Result) with its SQLite store on the `async` volume. An existingClaim is one volume
for every pod: it takes one replica, no autoscaler and the Recreate strategy (one writer).
*/}}
{{- define "meshserve.asyncEnabled" -}}
{{- if and (hasKey .Values "async") .Values.async.enabled -}}
{{- if .Values.async.existingClaim -}}
{{- $autoscaling := and (hasKey .Values "autoscaling") .Values.autoscaling.enabled -}}
{{- $recreate := eq (toString (get (default (dict) .Values.strategy) "type")) "Recreate" -}}
{{- if or (ne (int .Values.replicas) 1) $autoscaling (not $recreate) -}}
{{- fail "async.existingClaim holds one SQLite store: it needs replicas: 1, autoscaling.enabled: false and strategy.type: Recreate" -}}
{{- end -}}
{{- end -}}
true
{{- end -}}
{{- end -}}

{{/*
"true" when the chart has auth values and auth.enabled (the ingress); checks that the policy
and the keys are named.
*/}}
{{/* "true" when the chart has http values and http.enabled (the ingress): HTTP/REST. */}}
{{- define "meshserve.httpEnabled" -}}
{{- if and (hasKey .Values "http") .Values.http.enabled -}}true{{- end -}}
{{- end -}}

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
- {{ printf "--sample-seconds=%s" (include "meshserve.number" .Values.sampleSeconds) | quote }}
{{- if .Values.endpointSlices.watch }}
- {{ printf "--kubernetes-namespace=%s" (include "meshserve.endpointSliceNamespace" .) | quote }}
{{- end }}
{{- include "meshserve.args.allowCallers" . }}
{{- if include "meshserve.adminPolicyEnabled" . }}
- {{ printf "--policy=%s/%s" (trimSuffix "/" .Values.policy.mountPath) .Values.policy.key | quote }}
{{- end }}
{{- if include "meshserve.registryEnabled" . }}
{{- $registry := .Values.registry }}
{{- $data := trimSuffix "/" .Values.persistence.mountPath }}
{{- $keys := trimSuffix "/" $registry.keysMountPath }}
- {{ printf "--model-repository=%s" $registry.modelRepositoryMountPath | quote }}
- {{ printf "--registry-dir=%s/registry" $data | quote }}
{{- if $registry.signingKeySecret }}
- {{ printf "--signing-key=%s/signing/%s" $keys $registry.signingKeyKey | quote }}
{{- else }}
- {{ printf "--signing-key=%s/keys/signing.key" $data | quote }}
{{- end }}
{{- if $registry.kekSecret }}
- {{ printf "--kek-file=%s/kek/%s" $keys $registry.kekKey | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/*
"true" when the chart has registry values and registry.enabled (the control plane): pushed
versions land in the claim registry.modelRepositoryClaim, mounted read-write.
*/}}
{{- define "meshserve.registryEnabled" -}}
{{- if and (hasKey .Values "registry") .Values.registry.enabled -}}
{{- if not .Values.registry.modelRepositoryClaim -}}
{{- fail "registry.modelRepositoryClaim is required when registry.enabled: a ReadWriteMany PVC the control plane writes pushed versions to and compute pods mount read-only" -}}
{{- end -}}
true
{{- end -}}
{{- end -}}

{{/* "true" when the chart has policy values and names policy.configMap (the control plane). */}}
{{- define "meshserve.adminPolicyEnabled" -}}
{{- if and (hasKey .Values "policy") .Values.policy.configMap -}}
true
{{- end -}}
{{- end -}}

{{/* `--allow-callers=a,b` from .Values.allowCallers when the chart has it and it is not empty. */}}
{{- define "meshserve.args.allowCallers" -}}
{{- if and (hasKey .Values "allowCallers") .Values.allowCallers }}
- {{ printf "--allow-callers=%s" (join "," .Values.allowCallers) | quote }}
{{- end }}
{{- end -}}

{{/*
`--flag=value` when value is set; null leaves the service's default. Call with
(list "--flag" value).
*/}}
{{- define "meshserve.args.whenSet" -}}
{{- $value := index . 1 }}
{{- if not (kindIs "invalid" $value) }}
- {{ printf "%s=%s" (index . 0) (include "meshserve.number" $value) | quote }}
{{- end }}
{{- end -}}

{{/* As meshserve.args.whenSet, for an integer (YAML numbers reach templates as floats). */}}
{{- define "meshserve.args.whenSetInt" -}}
{{- $value := index . 1 }}
{{- if not (kindIs "invalid" $value) }}
- {{ printf "%s=%d" (index . 0) (int64 $value) | quote }}
{{- end }}
{{- end -}}
