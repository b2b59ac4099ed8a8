{{/*
The chart name, overridable with nameOverride. Truncated to 63 characters: names are DNS labels.
*/}}
{{- define "edpilot.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name, prefix of every object: the release name, plus the chart name unless the release
name already contains it. Truncated to leave room for component suffixes such as "-extender".
*/}}
{{- define "edpilot.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "edpilot.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels that select one component's pods. Call with (dict "ctx" $ "component" "operator").
*/}}
{{- define "edpilot.selectorLabels" -}}
app.kubernetes.io/name: {{ include "edpilot.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
Labels of every object. Call with (dict "ctx" $ "component" "operator"); component may be empty.
*/}}
{{- define "edpilot.labels" -}}
helm.sh/chart: {{ include "edpilot.chart" .ctx }}
app.kubernetes.io/name: {{ include "edpilot.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: edpilot
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
The ServiceAccount name of a component. Call with (dict "ctx" $ "component" "agent").
*/}}
{{- define "edpilot.serviceAccountName" -}}
{{- $sa := (index .ctx.Values .component).serviceAccount }}
{{- if $sa.create }}
{{- default (printf "%s-%s" (include "edpilot.fullname" .ctx) .component) $sa.name }}
{{- else }}
{{- required (printf "%s.serviceAccount.name is required when %s.serviceAccount.create is false" .component .component) $sa.name }}
{{- end }}
{{- end }}

{{/*
The image reference of a component: repository:tag, the tag defaulting to the chart's appVersion.
Call with (dict "ctx" $ "image" .Values.operator.image).
*/}}
{{- define "edpilot.image" -}}
{{- printf "%s:%s" .image.repository (default .ctx.Chart.AppVersion .image.tag) }}
{{- end }}

{{/*
The kopf peering object's name.
*/}}
{{- define "edpilot.peeringName" -}}
{{- default (include "edpilot.fullname" .) .Values.operator.peering.name }}
{{- end }}

{{/*
The extender's in-cluster URL, for kube-scheduler: https whenever the extender speaks TLS.
*/}}
{{- define "edpilot.extenderURL" -}}
{{- printf "%s://%s-extender.%s.svc:%d" (ternary "https" "http" .Values.extender.tls.enabled) (include "edpilot.fullname" .) .Release.Namespace (int .Values.extender.service.port) }}
{{- end }}

{{/*
The Secret holding the extender's serving certificate (tls.crt, tls.key) and the CA of the
certificates it accepts from the scheduler (ca.crt).
*/}}
{{- define "edpilot.extenderTLSSecret" -}}
{{- default (printf "%s-extender-tls" (include "edpilot.fullname" .)) .Values.extender.tls.existingSecret }}
{{- end }}

{{/*
The Secret holding the scheduler's client certificate for the extender (tls.crt, tls.key) and the
CA of the extender's serving certificate (ca.crt).
*/}}
{{- define "edpilot.extenderClientSecret" -}}
{{- if .Values.extender.tls.existingSecret }}
{{- required "scheduler.extender.clientSecret is required when extender.tls.existingSecret is set" .Values.scheduler.extender.clientSecret }}
{{- else }}
{{- default (printf "%s-extender-client" (include "edpilot.fullname" .)) .Values.scheduler.extender.clientSecret }}
{{- end }}
{{- end }}

{{/*
The username the API server gives the agents' ServiceAccount tokens.
*/}}
{{- define "edpilot.agentUsername" -}}
{{- printf "system:serviceaccount:%s:%s" .Release.Namespace (include "edpilot.serviceAccountName" (dict "ctx" . "component" "agent")) }}
{{- end }}

{{/*
The DRA flags the operator, the extender and the agent share (values dra.*). Call with $.
*/}}
{{- define "edpilot.draArgs" -}}
{{- if .Values.dra.enabled }}
{{- range .Values.dra.drivers }}
- --dra-driver={{ . }}
{{- end }}
{{- range .Values.dra.deviceClasses }}
- --dra-device-class={{ . }}
{{- end }}
- --dra-uuid-attribute={{ .Values.dra.uuidAttribute }}
{{- else }}
- --no-dra
{{- end }}
{{- end }}
