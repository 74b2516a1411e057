{{/* Names are cut at 63 characters, the longest a label value or DNS label may be. */}}
{{- define "kvpilot.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kvpilot.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "kvpilot.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "kvpilot.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* The operator's objects: Deployment, Service, monitors, PDB, NetworkPolicy, Lease. */}}
{{- define "kvpilot.operatorName" -}}
{{- printf "%s-operator" (include "kvpilot.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kvpilot.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kvpilot.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
app.kubernetes.io/managed-by is Helm's here; kvpilot's worker pods carry
managed-by=kvpilot, so the operator's own selectors never match the operator.
*/}}
{{- define "kvpilot.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "kvpilot.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kvpilot
{{- end -}}

{{- define "kvpilot.operatorSelector" -}}
app.kubernetes.io/name: {{ include "kvpilot.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "kvpilot.operatorLabels" -}}
{{ include "kvpilot.labels" . }}
app.kubernetes.io/component: operator
{{- end -}}

{{/*
repository[:tag][@digest]; the tag defaults to the chart's appVersion. A moving tag
would let two pods of one release run different code, so "latest" is refused.
Called with (list IMAGE-VALUES APP-VERSION "values.path").
*/}}
{{- define "kvpilot.image" -}}
{{- $image := index . 0 -}}
{{- $appVersion := index . 1 -}}
{{- if eq $image.tag "latest" -}}
{{- fail (printf "%s.tag: latest is a moving tag; pin a version or a digest" (index . 2)) -}}
{{- end -}}
{{- $ref := printf "%s:%s" $image.repository (default $appVersion $image.tag) -}}
{{- if $image.digest -}}
{{- $ref = printf "%s@%s" $ref $image.digest -}}
{{- end -}}
{{- $ref -}}
{{- end -}}

{{/* The router's objects: Deployment, Service, ServiceAccount, its RBAC. */}}
{{- define "kvpilot.routerName" -}}
{{- printf "%s-router" (include "kvpilot.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kvpilot.routerServiceAccountName" -}}
{{- if .Values.router.serviceAccount.create -}}
{{- default (include "kvpilot.routerName" .) .Values.router.serviceAccount.name -}}
{{- else -}}
{{- required "router.serviceAccount.name is required when router.serviceAccount.create is false" .Values.router.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "kvpilot.routerSelector" -}}
app.kubernetes.io/name: {{ include "kvpilot.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: router
{{- end -}}

{{- define "kvpilot.routerLabels" -}}
{{ include "kvpilot.labels" . }}
app.kubernetes.io/component: router
{{- end -}}
