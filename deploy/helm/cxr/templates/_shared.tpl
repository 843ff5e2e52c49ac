{{/* HPA, PDB, ServiceMonitor and NetworkPolicy peers shared by several components. */}}

{{- define "cxr.hpa" -}}
{{- $a := .values.autoscaling -}}
{{- $custom := and (hasKey $a "customMetric") $a.customMetric.enabled -}}
{{- if and (le (int $a.targetCPUUtilizationPercentage) 0) (not $custom) -}}
{{- fail (printf "%s.autoscaling: enable at least one metric (targetCPUUtilizationPercentage > 0 or customMetric.enabled)" .component) -}}
{{- end }}
---
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  {{- include "cxr.metadata" . | nindent 2 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: {{ .kind }}
    name: {{ include "cxr.componentName" . }}
  minReplicas: {{ $a.minReplicas }}
  maxReplicas: {{ $a.maxReplicas }}
  metrics:
    {{- if gt (int $a.targetCPUUtilizationPercentage) 0 }}
    - type: Resource
      resource:
        name: cpu
        target: {type: Utilization, averageUtilization: {{ $a.targetCPUUtilizationPercentage }}}
    {{- end }}
    {{- if $custom }}
    # Served by Prometheus Adapter from the pods' own series (see deploy/README.md, "Autoscaling").
    - type: Pods
      pods:
        metric: {name: {{ $a.customMetric.name }}}
        target: {type: AverageValue, averageValue: {{ $a.customMetric.targetAverageValue | quote }}}
    {{- end }}
  behavior:
    scaleDown:
      stabilizationWindowSeconds: 300
      policies: [{type: Pods, value: 1, periodSeconds: 120}]
    scaleUp:
      stabilizationWindowSeconds: 30
      policies: [{type: Pods, value: 2, periodSeconds: 60}]
{{- end -}}

{{- define "cxr.pdb" }}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  {{- include "cxr.metadata" . | nindent 2 }}
spec:
  maxUnavailable: {{ .values.pdb.maxUnavailable }}
  selector:
    matchLabels:
      {{- include "cxr.selectorLabels" . | nindent 6 }}
{{- end -}}

{{- define "cxr.serviceMonitor" }}
---
apiVersion: monitoring.coreos.com/v1
kind: ServiceMonitor
metadata:
  name: {{ include "cxr.componentName" . }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "cxr.labels" . | nindent 4 }}
    {{- with .values.serviceMonitor.labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  selector:
    matchLabels:
      {{- include "cxr.selectorLabels" . | nindent 6 }}
  namespaceSelector:
    matchNames: [{{ .root.Release.Namespace }}]
  endpoints:
    - port: {{ default "metrics" .port }}
      path: {{ default "/metrics" .path }}
      interval: {{ .values.serviceMonitor.interval }}
      scrapeTimeout: {{ .values.serviceMonitor.scrapeTimeout }}
{{- end -}}

{{/* NetworkPolicy peers of the services' gRPC ports: the chart's Kong pods (+ extraGatewayPeers). */}}
{{- define "cxr.gatewayPeer" -}}
{{- if .Values.kong.enabled }}
- podSelector:
    matchLabels:
      {{- include "cxr.selectorLabels" (dict "root" . "component" "kong") | nindent 6 }}
{{- end }}
{{- with .Values.networkPolicy.extraGatewayPeers }}
{{ toYaml . }}
{{- end }}
{{- if and (not .Values.kong.enabled) (not .Values.networkPolicy.extraGatewayPeers) }}
{{- fail "networkPolicy: kong.enabled=false leaves no gateway allowed to reach the services; set networkPolicy.extraGatewayPeers or disable the services' networkPolicy" }}
{{- end }}
{{- end -}}

{{/* NetworkPolicy peer: the chart's rag pods. */}}
{{- define "cxr.ragPeer" -}}
- podSelector:
    matchLabels:
      {{- include "cxr.selectorLabels" (dict "root" . "component" "rag") | nindent 6 }}
{{- end -}}

{{/* NetworkPolicy peer: Prometheus (namespace + optional pod selector). An empty namespace
     selector matches every namespace, so it is refused rather than opening the metrics ports. */}}
{{- define "cxr.monitoringPeer" -}}
{{- $sel := .Values.networkPolicy.monitoringNamespaceSelector -}}
{{- if not (or $sel.matchLabels $sel.matchExpressions) -}}
{{- fail "networkPolicy.monitoringNamespaceSelector: name at least one label (matchLabels) or expression (matchExpressions); an empty selector matches every namespace and would open the metrics ports to all of them" -}}
{{- end }}
- namespaceSelector:
    {{- toYaml .Values.networkPolicy.monitoringNamespaceSelector | nindent 4 }}
  {{- with .Values.networkPolicy.monitoringPodSelector }}
  podSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}
