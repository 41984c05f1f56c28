{{/* vim: set filetype=mustache: */}}
{{/*
Expand the name of the chart.
*/}}
{{- define "kvstore.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Create a default fully qualified app name.
We truncate at 63 chars because some Kubernetes name fields are limited to this (by the DNS naming spec).
If release name contains chart name it will be used as a full name.
*/}}
{{- define "kvstore.fullname" -}}
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

{{/*
Create chart name and version as used by the chart label.
*/}}
{{- define "kvstore.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Common labels (Kubernetes recommended labels).
*/}}
{{- define "kvstore.labels" -}}
helm.sh/chart: {{ include "kvstore.chart" . }}
{{ include "kvstore.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/part-of: kvstore
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/*
Selector labels.
*/}}
{{- define "kvstore.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kvstore.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/*
The image of every container.
*/}}
{{- define "kvstore.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) -}}
{{- end -}}

{{/*
Name of the Secret holding the auth token: the existing one, or the one the chart generates.
*/}}
{{- define "kvstore.secretName" -}}
{{- .Values.auth.existingSecret | default (printf "%s-auth" (include "kvstore.fullname" .)) -}}
{{- end -}}

{{/*
Name of the ConfigMap holding one kvstore config file per group.
*/}}
{{- define "kvstore.configMapName" -}}
{{- printf "%s-config" (include "kvstore.fullname" .) -}}
{{- end -}}

{{/*
Bytes of a size as kvstore/config.py's parse_size reads it: an integer, or a number with a
case-insensitive unit (K, KB, KiB, M, MiB, G, GiB, T, TiB; SI or binary).
Argument: (dict "value" SIZE "name" "path.of.the.value"). Fails, naming the value, on anything else.
*/}}
{{- define "kvstore.bytes" -}}
{{- $v := .value -}}
{{- if kindIs "string" $v -}}
{{- $s := trim $v -}}
{{- $num := regexFind "^[0-9]+(\\.[0-9]+)?" $s -}}
{{- $unit := trimPrefix $num $s | trim | lower -}}
{{- $units := dict "" 1 "b" 1 "k" 1000 "kb" 1000 "m" 1000000 "mb" 1000000 "g" 1000000000 "gb" 1000000000 "t" 1000000000000 "tb" 1000000000000 "ki" 1024 "kib" 1024 "mi" 1048576 "mib" 1048576 "gi" 1073741824 "gib" 1073741824 "ti" 1099511627776 "tib" 1099511627776 -}}
{{- if or (not $num) (not (hasKey $units $unit)) -}}
{{- fail (printf "%s=%q is not a size; use bytes or a number with a unit such as 512MiB or 4GiB" .name $v) -}}
{{- end -}}
{{- mulf (float64 $num) (get $units $unit) | int64 -}}
{{- else if or (kindIs "float64" $v) (kindIs "int64" $v) (kindIs "int" $v) -}}
{{- if lt (float64 $v) 0.0 -}}
{{- fail (printf "%s=%v is negative" .name $v) -}}
{{- end -}}
{{- int64 $v -}}
{{- else -}}
{{- fail (printf "%s=%v is not a size" .name $v) -}}
{{- end -}}
{{- end -}}

{{/*
A byte count as a Kubernetes quantity: whole GiB as "NGi", whole MiB as "NMi", else plain bytes.
*/}}
{{- define "kvstore.quantity" -}}
{{- $b := int64 . -}}
{{- if and (gt $b 0) (eq (mod $b 1073741824) 0) -}}
{{- printf "%dGi" (div $b 1073741824) -}}
{{- else if and (gt $b 0) (eq (mod $b 1048576) 0) -}}
{{- printf "%dMi" (div $b 1048576) -}}
{{- else -}}
{{- $b -}}
{{- end -}}
{{- end -}}
