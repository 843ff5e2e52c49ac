{{/* Names, labels and shared building blocks of the cxr chart. */}}

{{- define "cxr.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "cxr.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Name of one component's objects: <fullname>-<component>. Call with (dict "root" $ "component" "rag"). */}}
{{- define "cxr.componentName" -}}
{{- printf "%s-%s" (include "cxr.fullname" .root) .component | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "cxr.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cxr.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "cxr.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{ include "cxr.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: cxr
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "cxr.annotations" -}}
{{- with .root.Values.commonAnnotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Object metadata for a component: name, namespace, labels, annotations. */}}
{{- define "cxr.metadata" -}}
name: {{ include "cxr.componentName" . }}
namespace: {{ .root.Release.Namespace }}
labels:
  {{- include "cxr.labels" . | nindent 2 }}
{{- include "cxr.annotations" . }}
{{- end -}}

{{/* registry/repository:tag or @digest. Call with (dict "root" $ "image" .image). */}}
{{- define "cxr.image" -}}
{{- $registry := default .root.Values.global.imageRegistry .image.registry -}}
{{- $ref := .image.repository -}}
{{- if $registry }}{{ $ref = printf "%s/%s" $registry $ref }}{{ end -}}
{{- if .image.digest -}}
{{- printf "%s@%s" $ref .image.digest -}}
{{- else -}}
{{- printf "%s:%s" $ref (default .root.Chart.AppVersion .image.tag | toString) -}}
{{- end -}}
{{- end -}}

{{- define "cxr.imagePullSecrets" -}}
{{- with .Values.global.imagePullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- end -}}

{{/* resources plus the GPU limit (and request) when gpu.count > 0. Call with the component's values. */}}
{{- define "cxr.resources" -}}
{{- $res := deepCopy (default dict .resources) -}}
{{- if gt (int .gpu.count) 0 -}}
{{- $limits := default dict (get $res "limits") -}}
{{- $_ := set $limits .gpu.resourceName (int .gpu.count) -}}
{{- $_ := set $res "limits" $limits -}}
{{- end -}}
{{- toYaml $res -}}
{{- end -}}

{{/* Scheduling block shared by every workload: nodeSelector, tolerations, affinity, spread. */}}
{{- define "cxr.scheduling" -}}
{{- $v := .values -}}
{{- with $v.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if $v.affinity }}
affinity:
  {{- toYaml $v.affinity | nindent 2 }}
{{- else }}
affinity:
  podAntiAffinity:
    preferredDuringSchedulingIgnoredDuringExecution:
      - weight: 100
        podAffinityTerm:
          topologyKey: kubernetes.io/hostname
          labelSelector:
            matchLabels:
              {{- include "cxr.selectorLabels" . | nindent 14 }}
{{- end }}
{{- with $v.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- end -}}

{{- define "cxr.storageClass" -}}
{{- $sc := default .root.Values.global.storageClass .storageClass -}}
{{- if $sc }}
storageClassName: {{ $sc | quote }}
{{- end }}
{{- end -}}

{{- define "cxr.configName" -}}{{ include "cxr.fullname" . }}-config{{- end -}}

{{- define "cxr.apiKeySecretName" -}}
{{- default (printf "%s-api-keys" (include "cxr.fullname" .)) .Values.apiKeys.existingSecret -}}
{{- end -}}

{{- define "cxr.adminApiKeySecretName" -}}
{{- default (printf "%s-admin-api-keys" (include "cxr.fullname" .)) .Values.adminApiKeys.existingSecret -}}
{{- end -}}

{{- define "cxr.weightsClaimName" -}}
{{- default (printf "%s-model-weights" (include "cxr.fullname" .)) .Values.weights.pvc.existingClaim -}}
{{- end -}}

{{/* The service catalog (files/services.json links to libs/serving/src/cxr_serving/services.json) as JSON: name -> entry. */}}
{{- define "cxr.catalog" -}}
{{- $catalog := .Files.Get "files/services.json" | fromJson -}}
{{- if not $catalog.services -}}
{{- fail "files/services.json (link to libs/serving/src/cxr_serving/services.json) is missing or lists no services" -}}
{{- end -}}
{{- $out := dict -}}
{{- range $catalog.services }}{{- $_ := set $out .name . -}}{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/* The gRPC services of the catalog, in its order. */}}
{{- define "cxr.serviceNames" -}}
{{- $names := list -}}
{{- range (.Files.Get "files/services.json" | fromJson).services }}{{- $names = append $names .name -}}{{- end -}}
{{- join " " $names -}}
{{- end -}}

{{/*
  The services' JSON config: config/production.json (files/config.json links to it) with
  `.Values.config` deep-merged over it. A hand-written merge, because sprig's mergeOverwrite
  ignores false/0/"" overrides (enable_authentication: false would be lost). Returns JSON.
*/}}
{{- define "cxr.deepMerge" -}}
{{- $out := deepCopy .base -}}
{{- range $k, $v := .over -}}
{{- if and (kindIs "map" $v) (kindIs "map" (get $out $k)) -}}
{{- $_ := set $out $k (include "cxr.deepMerge" (dict "base" (get $out $k) "over" $v) | fromJson) -}}
{{- else -}}
{{- $_ := set $out $k $v -}}
{{- end -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{- define "cxr.configJson" -}}
{{- $base := .Files.Get "files/config.json" | fromJson -}}
{{- if not $base.services -}}
{{- fail "files/config.json (link to config/production.json) is missing or has no services section" -}}
{{- end -}}
{{- include "cxr.deepMerge" (dict "base" $base "over" (default dict .Values.config)) -}}
{{- end -}}
