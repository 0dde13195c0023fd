{{/* Names and labels shared by the chart's templates. */}}

{{- define "xpyd.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "xpyd.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/part-of: xpyd
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "xpyd.operator.selector" -}}
app.kubernetes.io/name: xpyd-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "xpyd.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "xpyd.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* True (non-empty) when the Prometheus Operator's CRDs are served. */}}
{{- define "xpyd.hasPrometheusOperator" -}}
{{- if .Capabilities.APIVersions.Has "monitoring.coreos.com/v1" -}}true{{- end -}}
{{- end -}}

{{/*
What the operator does with the Kubernetes API, and nothing more (a test
compares this with the calls in operator/src). Server-side apply that creates
an object is authorised as `create` as well as `patch`.
*/}}
{{- define "xpyd.operator.rules" -}}
- apiGroups: ["xpyd.dev"]
  resources: ["disaggdeployments"]
  verbs: ["list", "watch", "patch"]
- apiGroups: ["xpyd.dev"]
  resources: ["disaggdeployments/status"]
  verbs: ["patch"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "patch"]
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["list"]
- apiGroups: ["networking.k8s.io"]
  resources: ["ingresses"]
  verbs: ["list", "watch", "create", "patch", "delete"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end -}}
