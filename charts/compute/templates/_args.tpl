{{/* `meshserve compute` flags after the shared server flags (services/compute/service.py). */}}
{{- define "compute.args" -}}
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
