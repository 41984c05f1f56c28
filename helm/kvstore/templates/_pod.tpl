{{/* vim: set filetype=mustache: */}}
{{/*
Helpers shared by the head group and the worker groups. Each takes a dict:
  root   the chart's root context ($)
  group  the group's values (.Values.head or one item of .Values.workerGroups)
  role   "head" or "worker"
  name   "head" or the worker group's groupName (names the group's config file)
  path   where the group's values are, for error messages ("head", "workerGroups[0]")
Keys a worker group leaves out take the defaults written below (the same as the head's
defaults in values.yaml, documented in README.md).
*/}}

{{/*
Effective byte size of a tier setting of a group: the group's config, else the top-level
config, else kvstore/config.py's default (given as .default).
*/}}
{{- define "kvstore.groupBytes" -}}
{{- $groupConfig := dig "config" dict .group -}}
{{- $value := .default -}}
{{- $where := printf "%s.config.%s" .path .key -}}
{{- if hasKey $groupConfig .key -}}
{{- $value = get $groupConfig .key -}}
{{- else if hasKey .root.Values.config .key -}}
{{- $value = get .root.Values.config .key -}}
{{- $where = printf "config.%s" .key -}}
{{- end -}}
{{- include "kvstore.bytes" (dict "value" $value "name" $where) -}}
{{- end -}}

{{/*
Size of the group's /dev/shm in bytes: its host tier plus shmHeadroom.
host_tier_bytes defaults to 1GiB, kvstore/config.py's default.
*/}}
{{- define "kvstore.shmBytes" -}}
{{- $host := include "kvstore.groupBytes" (merge (dict "key" "host_tier_bytes" "default" "1GiB") .) | int64 -}}
{{- $headroom := include "kvstore.bytes" (dict "value" (dig "shmHeadroom" "1GiB" .group) "name" (printf "%s.shmHeadroom" .path)) | int64 -}}
{{- add $host $headroom -}}
{{- end -}}

{{/*
The group's kvstore config file (config.yaml): the top-level config, the group's config over
it, and the settings the chart owns. Names are kvstore/config.py's settings, unchanged.
flight_host is not here: KVSTORE_FLIGHT_HOST (the pod IP) sets it in every container.
*/}}
{{- define "kvstore.configFile" -}}
{{- $cfg := dict -}}
{{- range $key, $value := .root.Values.config -}}
{{- $_ := set $cfg $key $value -}}
{{- end -}}
{{- range $key, $value := dig "config" dict .group -}}
{{- $_ := set $cfg $key $value -}}
{{- end -}}
{{- $_ := set $cfg "http_host" "0.0.0.0" -}}
{{- $_ := set $cfg "http_port" .root.Values.ports.http -}}
{{- $_ := set $cfg "flight_port" .root.Values.ports.flight -}}
{{- $_ := set $cfg "auth_token_file" "/etc/kvstore/secret/token" -}}
{{- if include "kvstore.tenantsEnabled" .root -}}
{{- $_ := set $cfg "tenants_file" (printf "%s/%s" (include "kvstore.tenantsDir" .root) .root.Values.tenants.secretKey) -}}
{{- end -}}
{{- if .root.Values.tls.enabled -}}
{{- $tls := include "kvstore.tlsDir" .root -}}
{{- $_ := set $cfg "tls_cert_file" (printf "%s/tls.crt" $tls) -}}
{{- $_ := set $cfg "tls_key_file" (printf "%s/tls.key" $tls) -}}
{{- $_ := set $cfg "tls_ca_file" (printf "%s/ca.crt" $tls) -}}
{{- end -}}
{{- if ne (dig "nvme" "type" "none" .group) "none" -}}
{{- $_ := set $cfg "nvme_path" (dig "nvme" "mountPath" "/mnt/kvstore-nvme" .group) -}}
{{- end -}}
# kvstore settings of group {{ .name | quote }} ({{ .role }}), rendered by the {{ .root.Chart.Name }} chart.
# Names as in kvstore/config.py; KVSTORE_* environment variables override them.
{{ toYaml $cfg }}
{{- end -}}

{{/*
Checks a group's values beyond what values.schema.json can say; fails naming the value.
*/}}
{{- define "kvstore.validateGroup" -}}
{{- $gpus := dig "gpus" 0 .group | int -}}
{{- $hbm := include "kvstore.groupBytes" (merge (dict "key" "hbm_tier_bytes" "default" 0) .) | int64 -}}
{{- if and (gt $hbm 0) (eq $gpus 0) -}}
{{- fail (printf "%s: hbm_tier_bytes is %d but the group has no GPUs; the HBM tier needs gpus > 0 (worker groups only)" .path $hbm) -}}
{{- end -}}
{{- $nvme := include "kvstore.groupBytes" (merge (dict "key" "nvme_tier_bytes" "default" 0) .) | int64 -}}
{{- $nvmeType := dig "nvme" "type" "none" .group -}}
{{- if and (gt $nvme 0) (eq $nvmeType "none") -}}
{{- fail (printf "%s: nvme_tier_bytes is %d but %s.nvme.type is none; use hostPath or pvc" .path $nvme .path) -}}
{{- end -}}
{{- if eq $nvmeType "pvc" -}}
{{- $size := include "kvstore.bytes" (dict "value" (dig "nvme" "pvc" "size" "100Gi" .group) "name" (printf "%s.nvme.pvc.size" .path)) | int64 -}}
{{- if lt $size $nvme -}}
{{- fail (printf "%s.nvme.pvc.size (%d bytes) is smaller than nvme_tier_bytes (%d)" .path $size $nvme) -}}
{{- end -}}
{{- end -}}
{{- $memory := dig "resources" "limits" "memory" "" .group -}}
{{- if or (not (kindIs "string" $memory)) (regexMatch "^[0-9]+(\\.[0-9]+)?([KMGT]i?)?$" $memory) -}}
{{- $memoryBytes := include "kvstore.bytes" (dict "value" $memory "name" (printf "%s.resources.limits.memory" .path)) | int64 -}}
{{- $shm := include "kvstore.shmBytes" . | int64 -}}
{{- if lt $memoryBytes $shm -}}
{{- fail (printf "%s.resources.limits.memory (%d bytes) is smaller than /dev/shm (%d bytes: host_tier_bytes + shmHeadroom); shared-memory pages count against the memory limit" .path $memoryBytes $shm) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
rayStartParams of a group: the group's own, as strings, plus num-gpus from gpus and Ray's ports
from `ray` (values.schema.json refuses those keys in a group's rayStartParams).
*/}}
{{- define "kvstore.rayStartParams" -}}
{{- $params := dict -}}
{{- range $key, $value := dig "rayStartParams" dict .group -}}
{{- $_ := set $params $key (toString $value) -}}
{{- end -}}
{{- $params = merge $params (include "kvstore.rayPortParams" . | fromYaml) -}}
{{- $gpus := dig "gpus" 0 .group | int -}}
{{- if gt $gpus 0 -}}
{{- $_ := set $params "num-gpus" (toString $gpus) -}}
{{- end -}}
{{- toYaml $params -}}
{{- end -}}

{{/*
Environment of every container: where the config file is, the pod IP as flight_host, and Ray's
authentication (every container is a Ray process or a Ray driver).
*/}}
{{- define "kvstore.env" -}}
- name: KVSTORE_CONFIG
  value: /etc/kvstore/config.yaml
- name: KVSTORE_FLIGHT_HOST
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
{{ include "kvstore.rayAuthEnv" .root }}
{{- end -}}

{{/*
Volume mounts shared by the containers of a pod: /tmp (Ray's sessions and sockets), /dev/shm
(host tier and Ray's object store), /etc/kvstore (config.yaml, secret/token, and with them on
tenants/<tenants.secretKey> and tls/{tls.crt,tls.key,ca.crt}) and, with Ray's auth on,
/etc/ray/auth (Ray's token).
*/}}
{{- define "kvstore.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: dshm
  mountPath: /dev/shm
- name: kvstore-etc
  mountPath: /etc/kvstore
  readOnly: true
{{- with include "kvstore.rayAuthVolumeMount" .root }}
{{ . }}
{{- end }}
{{- end -}}

{{/*
The pod template of a group.
*/}}
{{- define "kvstore.podTemplate" -}}
{{- $root := .root -}}
{{- $group := .group -}}
{{- $gpus := dig "gpus" 0 $group | int -}}
{{- $nvme := dig "nvme" dict $group -}}
{{- $nvmeType := dig "type" "none" $nvme -}}
{{- $labels := merge (dict) (dig "podLabels" dict $group) $root.Values.podLabels -}}
{{- $annotations := merge (dict) (dig "podAnnotations" dict $group) $root.Values.podAnnotations -}}
{{- $resources := deepCopy (dig "resources" dict $group) -}}
{{- if gt $gpus 0 -}}
{{- $_ := set $resources "limits" (merge (dict "nvidia.com/gpu" $gpus) (dig "limits" dict $resources)) -}}
{{- $_ := set $resources "requests" (merge (dict "nvidia.com/gpu" $gpus) (dig "requests" dict $resources)) -}}
{{- end -}}
metadata:
  labels:
    {{- include "kvstore.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .role }}
    {{- with $labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $root.Values.podSecurityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with dig "nodeSelector" dict $group }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with dig "tolerations" list $group }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with dig "affinity" dict $group }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    # The Ray node; KubeRay runs `ray start` in the first container.
    - name: ray-{{ .role }}
      image: {{ include "kvstore.image" $root }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      {{- with $root.Values.securityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      # KubeRay's head Service <fullname>-head-svc carries the head's ports: the dashboard only
      # when ray.dashboard.exposeInCluster asks for it.
      ports:
        {{- if eq .role "head" }}
        - name: gcs-server
          containerPort: {{ include "kvstore.gcsPort" $root }}
        {{- if $root.Values.ray.dashboard.exposeInCluster }}
        - name: dashboard
          containerPort: {{ $root.Values.ray.dashboard.port }}
        {{- end }}
        - name: client
          containerPort: {{ include "kvstore.rayClientPort" $root }}
        {{- end }}
        # Declared so KubeRay does not add its default 8080 beside a moved metrics-export-port.
        - name: metrics
          containerPort: {{ $root.Values.ray.ports.metricsExport }}
        - name: flight
          containerPort: {{ $root.Values.ports.flight }}
      env:
        {{- include "kvstore.env" . | nindent 8 }}
        {{- if eq $nvmeType "hostPath" }}
        # The NVMe file on a host path is found again by the Kubernetes node's name: a recreated
        # pod (a new name) on the same node re-adopts it. One pod per node and host path.
        - name: KVSTORE_NODE_NAME
          valueFrom:
            fieldRef:
              fieldPath: spec.nodeName
        {{- end }}
      {{- with $resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      volumeMounts:
        {{- include "kvstore.volumeMounts" . | nindent 8 }}
        {{- if ne $nvmeType "none" }}
        - name: nvme
          mountPath: {{ dig "mountPath" "/mnt/kvstore-nvme" $nvme }}
        {{- end }}
    {{- if eq .role "head" }}
    {{- $service := $group.serviceContainer }}
    # The kvstore service: controller, node actors and the HTTP API, driving the local Ray head.
    - name: kvstore
      image: {{ include "kvstore.image" $root }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      command: ["kvstore", "serve", "--config", "/etc/kvstore/config.yaml"]
      {{- with $root.Values.securityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      ports:
        - name: http
          containerPort: {{ $root.Values.ports.http }}
      env:
        {{- include "kvstore.env" . | nindent 8 }}
        - name: KVSTORE_RAY_ADDRESS
          value: "127.0.0.1:6379"
      # With TLS the service speaks https only; the kubelet does not check the certificate.
      readinessProbe:
        httpGet:
          path: /healthz
          port: http
          {{- if $root.Values.tls.enabled }}
          scheme: HTTPS
          {{- end }}
        {{- with $service.readinessProbe }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      livenessProbe:
        httpGet:
          path: /healthz
          port: http
          {{- if $root.Values.tls.enabled }}
          scheme: HTTPS
          {{- end }}
        {{- with $service.livenessProbe }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with $service.resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      volumeMounts:
        {{- include "kvstore.volumeMounts" . | nindent 8 }}
    {{- end }}
  volumes:
    - name: tmp
      emptyDir: {}
    # The host tier and Ray's object store; with /dev/shm mounted, KubeRay adds no shm volume of its own.
    - name: dshm
      emptyDir:
        medium: Memory
        sizeLimit: {{ include "kvstore.shmBytes" . | include "kvstore.quantity" }}
    - name: kvstore-etc
      projected:
        sources:
          - configMap:
              name: {{ include "kvstore.configMapName" $root }}
              items:
                - key: {{ .name }}.yaml
                  path: config.yaml
          - secret:
              name: {{ include "kvstore.secretName" $root }}
              items:
                - key: {{ $root.Values.auth.secretKey }}
                  path: secret/token
                  mode: 288 # 0440: readable through fsGroup
          {{- if include "kvstore.tenantsEnabled" $root }}
          # The tenants file (tenants_file): part of this projected volume, not a subPath mount,
          # so an updated Secret reaches the running pod and kvstore rereads it.
          - secret:
              name: {{ include "kvstore.tenantsSecretName" $root }}
              items:
                - key: {{ $root.Values.tenants.secretKey }}
                  path: tenants/{{ $root.Values.tenants.secretKey }}
                  mode: 288 # 0440
          {{- end }}
          {{- if $root.Values.tls.enabled }}
          # TLS of Flight and HTTP (tls_cert_file, tls_key_file, tls_ca_file).
          - secret:
              name: {{ $root.Values.tls.existingSecret }}
              items:
                - key: tls.crt
                  path: tls/tls.crt
                  mode: 288 # 0440
                - key: tls.key
                  path: tls/tls.key
                  mode: 288 # 0440
                - key: ca.crt
                  path: tls/ca.crt
                  mode: 288 # 0440
          {{- end }}
    {{- if $root.Values.ray.auth.enabled }}
    # Ray's token, apart from kvstore's: the autoscaler container mounts this one alone.
    - name: ray-auth
      secret:
        secretName: {{ include "kvstore.rayAuthSecretName" $root }}
        items:
          - key: {{ $root.Values.ray.auth.secretKey }}
            path: token
            mode: 288 # 0440: readable through fsGroup
    {{- end }}
    {{- if eq $nvmeType "hostPath" }}
    - name: nvme
      hostPath:
        path: {{ dig "hostPath" "path" "/mnt/nvme/kvstore" $nvme }}
        type: {{ dig "hostPath" "type" "DirectoryOrCreate" $nvme }}
    {{- else if eq $nvmeType "pvc" }}
    - name: nvme
      ephemeral:
        volumeClaimTemplate:
          metadata:
            labels:
              {{- include "kvstore.labels" $root | nindent 14 }}
              app.kubernetes.io/component: {{ .role }}
          spec:
            accessModes:
              {{- toYaml (dig "pvc" "accessModes" (list "ReadWriteOnce") $nvme) | nindent 14 }}
            {{- with dig "pvc" "storageClassName" "" $nvme }}
            storageClassName: {{ . }}
            {{- end }}
            resources:
              requests:
                storage: {{ dig "pvc" "size" "100Gi" $nvme }}
    {{- end }}
{{- end -}}
