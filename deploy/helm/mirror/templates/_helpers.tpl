{{/* The name of every object of the release. */}}
{{- define "mirror.name" -}}
{{- printf "%s-agent" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "mirror.labels" -}}
app.kubernetes.io/name: mirror-agent
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
