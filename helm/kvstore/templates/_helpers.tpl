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

{{/*
Name of the Secret holding Ray's auth token: the existing one, or the one the chart generates.
*/}}
{{- define "kvstore.rayAuthSecretName" -}}
{{- .Values.ray.auth.existingSecret | default (printf "%s-ray-auth" (include "kvstore.fullname" .)) -}}
{{- end -}}

{{/*
Where every container reads Ray's token (RAY_AUTH_TOKEN_PATH): a file from the Secret, not an
environment variable, so it stays out of `env` dumps and process listings of child processes.
*/}}
{{- define "kvstore.rayAuthDir" -}}/etc/ray/auth{{- end -}}

{{/*
Ray's authentication environment, for every container that talks to Ray (the Ray containers, the
kvstore container, the autoscaler). RAY_AUTH_MODE is set either way: Ray 2.60 otherwise turns
token auth on by itself in a process that finds ~/.ray/auth_token, and off in the others.
*/}}
{{- define "kvstore.rayAuthEnv" -}}
{{- if .Values.ray.auth.enabled -}}
- name: RAY_AUTH_MODE
  value: token
- name: RAY_AUTH_TOKEN_PATH
  value: {{ include "kvstore.rayAuthDir" . }}/token
{{- else -}}
- name: RAY_AUTH_MODE
  value: disabled
{{- end -}}
{{- end -}}

{{/*
The volume mount of Ray's token (empty when Ray's auth is off).
*/}}
{{- define "kvstore.rayAuthVolumeMount" -}}
{{- if .Values.ray.auth.enabled -}}
- name: ray-auth
  mountPath: {{ include "kvstore.rayAuthDir" . }}
  readOnly: true
{{- end -}}
{{- end -}}

{{/*
Ray's ports of a group as `ray start` parameters (strings): pinned on every node so that the
NetworkPolicy can name them. The head adds the dashboard's address and port.
Argument: (dict "root" $ "role" "head"|"worker").
*/}}
{{- define "kvstore.rayPortParams" -}}
{{- $ports := .root.Values.ray.ports -}}
{{- $params := dict
  "node-manager-port" (toString $ports.nodeManager)
  "object-manager-port" (toString $ports.objectManager)
  "dashboard-agent-grpc-port" (toString $ports.dashboardAgentGrpc)
  "dashboard-agent-listen-port" (toString $ports.dashboardAgentHttp)
  "runtime-env-agent-port" (toString $ports.runtimeEnvAgent)
  "metrics-export-port" (toString $ports.metricsExport)
  "min-worker-port" (toString $ports.minWorker)
  "max-worker-port" (toString $ports.maxWorker) -}}
{{- if eq .role "head" -}}
{{- /* KubeRay sets dashboard-host to 0.0.0.0 when it is missing: always set it. */ -}}
{{- $_ := set $params "dashboard-host" (ternary "0.0.0.0" "127.0.0.1" .root.Values.ray.dashboard.exposeInCluster) -}}
{{- $_ := set $params "dashboard-port" (toString .root.Values.ray.dashboard.port) -}}
{{- end -}}
{{- toYaml $params -}}
{{- end -}}

{{/*
Ray's GCS and client server ports: Ray's defaults, which the chart does not move (the kvstore
container reaches GCS at 127.0.0.1:6379, and passing --ray-client-server-port fails on images
without ray[client]).
*/}}
{{- define "kvstore.gcsPort" -}}6379{{- end -}}
{{- define "kvstore.rayClientPort" -}}10001{{- end -}}

{{/*
Checks that the ports of Ray and kvstore are distinct and outside the worker port range; fails
naming the two values that collide.
*/}}
{{- define "kvstore.validatePorts" -}}
{{- $p := .Values.ray.ports -}}
{{- if gt (int $p.minWorker) (int $p.maxWorker) -}}
{{- fail (printf "ray.ports.minWorker (%v) is above ray.ports.maxWorker (%v)" $p.minWorker $p.maxWorker) -}}
{{- end -}}
{{- $named := list
  (list "ray.ports.nodeManager" $p.nodeManager)
  (list "ray.ports.objectManager" $p.objectManager)
  (list "ray.ports.dashboardAgentGrpc" $p.dashboardAgentGrpc)
  (list "ray.ports.dashboardAgentHttp" $p.dashboardAgentHttp)
  (list "ray.ports.runtimeEnvAgent" $p.runtimeEnvAgent)
  (list "ray.ports.metricsExport" $p.metricsExport)
  (list "ray.dashboard.port" .Values.ray.dashboard.port)
  (list "ports.http" .Values.ports.http)
  (list "ports.flight" .Values.ports.flight)
  (list "Ray's GCS port" (include "kvstore.gcsPort" . | int))
  (list "Ray's client server port" (include "kvstore.rayClientPort" . | int)) -}}
{{- $seen := dict -}}
{{- range $named -}}
{{- $name := index . 0 -}}
{{- $port := index . 1 | int -}}
{{- if hasKey $seen (toString $port) -}}
{{- fail (printf "%s and %s are both %d; every port of Ray and kvstore must be distinct" (get $seen (toString $port)) $name $port) -}}
{{- end -}}
{{- $_ := set $seen (toString $port) $name -}}
{{- if and (ge $port (int $p.minWorker)) (le $port (int $p.maxWorker)) -}}
{{- fail (printf "%s (%d) is inside Ray's worker port range ray.ports.minWorker..maxWorker (%v-%v)" $name $port $p.minWorker $p.maxWorker) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
Where every container finds the tenants file and the TLS files: directories of the projected
volume mounted at /etc/kvstore (no subPath, so a changed Secret reaches running pods).
*/}}
{{- define "kvstore.tenantsDir" -}}/etc/kvstore/tenants{{- end -}}
{{- define "kvstore.tlsDir" -}}/etc/kvstore/tls{{- end -}}

{{/*
"true" when a tenants file is mounted (tenants.existingSecret or tenants.list), else empty.
*/}}
{{- define "kvstore.tenantsEnabled" -}}
{{- if or .Values.tenants.existingSecret .Values.tenants.list -}}true{{- end -}}
{{- end -}}

{{/*
Name of the Secret holding the tenants file: the existing one, or the one the chart makes from
tenants.list.
*/}}
{{- define "kvstore.tenantsSecretName" -}}
{{- .Values.tenants.existingSecret | default (printf "%s-tenants" (include "kvstore.fullname" .)) -}}
{{- end -}}

{{/*
The tenants file the chart writes from tenants.list (kvstore/tenants.py's format).
*/}}
{{- define "kvstore.tenantsFile" -}}
{{- $tenants := list -}}
{{- range .Values.tenants.list -}}
{{- $tenant := dict "name" .name "token" .token -}}
{{- if .key_secret -}}
{{- $_ := set $tenant "key_secret" .key_secret -}}
{{- end -}}
{{- if .shared -}}
{{- $_ := set $tenant "shared" true -}}
{{- end -}}
{{- if .quota -}}
{{- $_ := set $tenant "quota" .quota -}}
{{- end -}}
{{- $tenants = append $tenants $tenant -}}
{{- end -}}
{{- toYaml (dict "tenants" $tenants) -}}
{{- end -}}

{{/*
Checks of tenants beyond values.schema.json (which checks each tenant's name and token); fails
naming the value. kvstore refuses such a file too, but only when a pod starts.
*/}}
{{- define "kvstore.validateTenants" -}}
{{- if and .Values.tenants.existingSecret .Values.tenants.list -}}
{{- fail (printf "tenants.existingSecret (%s) and tenants.list are both set; use one (the list is written into a Secret the chart creates)" .Values.tenants.existingSecret) -}}
{{- end -}}
{{- $names := dict -}}
{{- $tokens := dict -}}
{{- range $i, $tenant := .Values.tenants.list -}}
{{- if hasKey $names $tenant.name -}}
{{- fail (printf "tenants.list[%d].name=%q is used twice; tenant names must be unique" $i $tenant.name) -}}
{{- end -}}
{{- $_ := set $names $tenant.name true -}}
{{- $hash := sha256sum $tenant.token -}}
{{- if hasKey $tokens $hash -}}
{{- fail (printf "tenants.list[%d] (%s): its token is tenants.list[%d]'s too; every tenant needs its own" $i $tenant.name (get $tokens $hash)) -}}
{{- end -}}
{{- $_ := set $tokens $hash $i -}}
{{- end -}}
{{- end -}}

{{/*
Name the HTTP service's certificate is checked under by the ServiceMonitor (it scrapes the pod IP):
the head's tls_server_name.
*/}}
{{- define "kvstore.headTLSServerName" -}}
{{- dig "config" "tls_server_name" (.Values.config.tls_server_name | default "kvstore") .Values.head -}}
{{- end -}}
