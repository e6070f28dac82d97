{{/* The name of every object of the release. */}}
{{- define "mirror.name" -}}
{{- printf "%s-agent" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The collector's objects. */}}
{{- define "mirror.collectorName" -}}
{{- printf "%s-collector" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* What the agent's selectors match: never changes between releases (selectors are immutable). */}}
{{- define "mirror.selectorLabels" -}}
app.kubernetes.io/name: mirror-agent
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "mirror.collectorSelectorLabels" -}}
app.kubernetes.io/name: mirror-collector
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The labels every object carries besides its selector labels. */}}
{{- define "mirror.commonLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: mirror
{{- end -}}

{{- define "mirror.labels" -}}
{{ include "mirror.selectorLabels" . }}
{{ include "mirror.commonLabels" . }}
app.kubernetes.io/component: agent
{{- end -}}

{{- define "mirror.collectorLabels" -}}
{{ include "mirror.collectorSelectorLabels" . }}
{{ include "mirror.commonLabels" . }}
app.kubernetes.io/component: collector
{{- end -}}

{{/* The image of the agent (the collector is the same binary). */}}
{{- define "mirror.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
