{{/*
How the umbrella renders a component through the library chart: it builds, per component
(and per model version for compute and batcher), the Values a service chart would have, and
calls the library's templates with a context holding them (the library reads the component
from Values.component).
*/}}

{{/* What every component starts from: the service charts' defaults the umbrella keeps. */}}
{{- define "meshserve.umbrella.base" -}}
nameOverride: ""
fullnameOverride: ""
replicas: 1
strategy: {}
serviceAccount:
  create: false
  name: ""
  annotations: {}
service:
  type: ClusterIP
  port: null
  annotations: {}
podDisruptionBudget:
  enabled: true
  maxUnavailable: 1
env: []
podLabels: {}
podAnnotations: {}
priorityClassName: ""
resources: {}
nodeSelector: {}
tolerations: []
affinity: {}
topologySpreadConstraints: []
{{- end -}}

{{/* The top-level values every component shares (a component's section may replace each). */}}
{{- define "meshserve.umbrella.sharedKeys" -}}
image imagePullSecrets commonLabels clusterDomain listenHost logLevel drainSeconds terminationGraceMarginSeconds preStopSleepSeconds revisionHistoryLimit tmpSizeLimit probes podSecurityContext securityContext metrics serviceMonitor
{{- end -}}

{{/*
One component's Values, as YAML: the base, then the shared values, then each layer in order
(a later layer's key replaces an earlier one's). Call with
(dict "root" $ "component" "router" "layers" (list $.Values.router $computed)).
*/}}
{{- define "meshserve.umbrella.values" -}}
{{- $root := .root -}}
{{- $values := fromYaml (include "meshserve.umbrella.base" $root) -}}
{{- /* A key set to null is gone from Values (Helm's way to drop a default): it stays unset
here too, as in a service chart; `get` would make it "". */ -}}
{{- range $key := splitList " " (include "meshserve.umbrella.sharedKeys" $root) -}}
{{- if hasKey $root.Values $key -}}
{{- $_ := set $values $key (get $root.Values $key) -}}
{{- end -}}
{{- end -}}
{{- range $layer := .layers -}}
{{- range $key, $value := $layer -}}
{{- $_ := set $values $key $value -}}
{{- end -}}
{{- end -}}
{{- $_ := set $values "component" .component -}}
{{- $_ := set $values "nameOverride" .component -}}
{{- $_ := set $values "fullnameOverride" (default (printf "%s-%s" $root.Release.Name .component) (get $values "fullnameOverride")) -}}
{{- $_ := set $values "serviceAccount" (dict "create" false "name" (printf "%s-%s" $root.Release.Name .component) "annotations" (dict)) -}}
{{- $_ := set $values "tls" (dict "mountPath" $root.Values.tls.mountPath "identity" "" "secretName" (include "meshserve.umbrella.secretName" (dict "root" $root "component" .component))) -}}
{{- $_ := set $values "certManager" (dict "enabled" false) -}}
{{- toYaml $values -}}
{{- end -}}

{{/*
What only the cluster can provide, and so no default can: every pod's certificate and the
model repository. Included first by every template of this chart, so that `helm install` with
values that leave any of them out stops with one message naming all the values to set.
*/}}
{{- define "meshserve.umbrella.required" -}}
{{- $missing := list -}}
{{- if not .Values.certManager.enabled -}}
{{- $unset := list -}}
{{- range $key := list "controlPlane" "router" "ingress" "batcher" "compute" -}}
{{- if not (get $.Values.tls.secretNames $key) -}}
{{- $unset = append $unset (printf "tls.secretNames.%s" $key) -}}
{{- end -}}
{{- end -}}
{{- if $unset -}}
{{- $missing = append $missing (printf "certificates: certManager.enabled=true and certManager.issuerRef.name (a cert-manager CA issuer), or existing Secrets holding tls.crt, tls.key and ca.crt: %s" (join ", " $unset)) -}}
{{- end -}}
{{- end -}}
{{- if not (or .Values.modelRepository.existingClaim .Values.modelRepository.init.command) -}}
{{- $missing = append $missing "the model repository (Triton's layout): modelRepository.existingClaim (a ReadOnlyMany PersistentVolumeClaim) or modelRepository.init.command (fills an emptyDir in every pod)" -}}
{{- end -}}
{{- if $missing -}}
{{- fail (printf "meshserve needs values that only your cluster can provide (see the README's \"Kubernetes\" section); set:\n- %s" (join "\n- " $missing)) -}}
{{- end -}}
{{- end -}}

{{/* The Secret of an identity: cert-manager's <release>-<identity>-tls, or tls.secretNames
(meshserve.umbrella.required has checked that it is set). */}}
{{- define "meshserve.umbrella.secretName" -}}
{{- $root := .root -}}
{{- if $root.Values.certManager.enabled -}}
{{- printf "%s-%s-tls" $root.Release.Name .component -}}
{{- else -}}
{{- $key := eq .component "control-plane" | ternary "controlPlane" .component -}}
{{- get $root.Values.tls.secretNames $key -}}
{{- end -}}
{{- end -}}

{{/*
Every object of one component, as YAML documents. Call with (dict "root" $ "values" $values):
Deployment (or StatefulSet), Service, PodDisruptionBudget, NetworkPolicy, and when the
component has them, a HorizontalPodAutoscaler, a PersistentVolumeClaim, its RBAC and the
backup CronJob (the control plane's: controlPlane.backup), and a
ServiceMonitor (not for compute and batcher, which render one per component for all model
versions: meshserve.umbrella.modelServiceMonitors).
*/}}
{{- define "meshserve.umbrella.objects" -}}
{{- $root := .root -}}
{{- $context := dict "Values" .values "Chart" $root.Chart "Release" $root.Release "Capabilities" $root.Capabilities "Template" $root.Template -}}
{{- $documents := list (include "meshserve.deployment" $context) (include "meshserve.service" $context) (include "meshserve.podDisruptionBudget" $context) (include "meshserve.networkPolicy" $context) -}}
{{- if hasKey .values "autoscaling" -}}
{{- $documents = append $documents (include "meshserve.horizontalPodAutoscaler" $context) -}}
{{- end -}}
{{- if not (has .values.component (list "compute" "batcher")) -}}
{{- $documents = append $documents (include "meshserve.serviceMonitor" $context) -}}
{{- end -}}
{{- if hasKey .values "persistence" -}}
{{- $documents = append $documents (include "meshserve.persistentVolumeClaim" $context) -}}
{{- $documents = append $documents (include "meshserve.endpointSliceRbac" $context) -}}
{{- $documents = append $documents (include "meshserve.backupCronJob" $context) -}}
{{- end -}}
{{- range $document := $documents }}
{{- if trim $document }}
---
{{ $document }}
{{- end }}
{{- end }}
{{- end -}}

{{/* A model's name as it may appear in object names: lower case, [a-z0-9-]. */}}
{{- define "meshserve.umbrella.modelSlug" -}}
{{- regexReplaceAll "[^a-z0-9-]+" (lower (toString .name)) "-" | trimAll "-" -}}-{{ include "meshserve.number" .version }}
{{- end -}}

{{/*
The ServiceMonitors of compute and batcher: one each (<release>-compute, <release>-batcher),
selecting the Services of every model version by their labels (name, instance, component,
part-of); the pods' model and version labels become target labels. From the section's values.
*/}}
{{- define "meshserve.umbrella.modelServiceMonitors" -}}
{{- $root := . -}}
{{- if $root.Values.models -}}
{{- range $component := list "compute" "batcher" -}}
{{- $values := include "meshserve.umbrella.values" (dict "root" $root "component" $component "layers" (list (get $root.Values $component))) | fromYaml -}}
{{- $context := dict "Values" $values "Chart" $root.Chart "Release" $root.Release "Capabilities" $root.Capabilities "Template" $root.Template -}}
{{- with include "meshserve.serviceMonitor" $context }}
---
{{ . }}
{{- end }}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
Where computes send their Python models' calls to other models (--bls-target): "" unless
compute.bls.enabled; then compute.bls.target, or this release's ingress Service on its gRPC
port (the port its Service exposes).
*/}}
{{- define "meshserve.umbrella.blsTarget" -}}
{{- $bls := default (dict) .Values.compute.bls -}}
{{- if $bls.enabled -}}
{{- $ingress := .Values.ingress -}}
{{- $port := default $ingress.port (get (default (dict) $ingress.service) "port") -}}
{{- default (printf "%s-ingress:%d" .Release.Name (int $port)) $bls.target -}}
{{- else if $bls.target -}}
{{- fail "compute.bls.target needs compute.bls.enabled: true (the target alone turns nothing on)" -}}
{{- end -}}
{{- end -}}
