{{/* Resource name prefix: fullnameOverride or the release name. */}}
{{- define "lingbot.fullname" -}}
{{- default .Release.Name .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels of a component; call with (dict "root" $ "name" "<component>"). */}}
{{- define "lingbot.selectorLabels" -}}
app.kubernetes.io/name: {{ .name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- end -}}

{{/* All labels of a component's objects; call with (dict "root" $ "name" "<component>"). */}}
{{- define "lingbot.labels" -}}
{{ include "lingbot.selectorLabels" . }}
app.kubernetes.io/part-of: lingbot-va
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* The restricted Pod Security profile, for a given user/group id. */}}
{{- define "lingbot.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ . }}
runAsGroup: {{ . }}
fsGroup: {{ . }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "lingbot.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end -}}

{{- define "lingbot.image" -}}
image: {{ printf "%s:%s" .repository .tag | quote }}
imagePullPolicy: {{ .pullPolicy | default "IfNotPresent" }}
{{- end -}}

{{- define "lingbot.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Secret names: the component's existingSecret, else the chart's (placeholder) Secret. */}}
{{- define "lingbot.postgresSecret" -}}
{{- default (printf "%s-postgres-auth" (include "lingbot.fullname" .)) .Values.postgres.existingSecret -}}
{{- end -}}
{{- define "lingbot.minioSecret" -}}
{{- default (printf "%s-minio-auth" (include "lingbot.fullname" .)) .Values.minio.existingSecret -}}
{{- end -}}
{{- define "lingbot.mlflowSecret" -}}
{{- default (printf "%s-mlflow-store" (include "lingbot.fullname" .)) .Values.mlflow.existingSecret -}}
{{- end -}}
{{- define "lingbot.s3Secret" -}}
{{- default (printf "%s-s3" (include "lingbot.fullname" .)) .Values.pipeline.s3Secret -}}
{{- end -}}
{{- define "lingbot.tokenSecret" -}}
{{- default (printf "%s-policy-token" (include "lingbot.fullname" .)) .Values.policy.tokenSecret.name -}}
{{- end -}}

{{/* Where the services are: in-cluster Service names, or the external endpoints when a component is disabled. */}}
{{- define "lingbot.postgresHost" -}}
{{- if .Values.postgres.enabled -}}
{{- printf "%s-postgres" (include "lingbot.fullname" .) -}}
{{- else -}}
{{- required "postgres.externalHost is required when postgres.enabled is false" .Values.postgres.externalHost -}}
{{- end -}}
{{- end -}}
{{- define "lingbot.s3Endpoint" -}}
{{- if .Values.minio.enabled -}}
{{- printf "http://%s-minio:9000" (include "lingbot.fullname" .) -}}
{{- else -}}
{{- required "minio.externalEndpoint is required when minio.enabled is false" .Values.minio.externalEndpoint -}}
{{- end -}}
{{- end -}}
{{- define "lingbot.mlflowUri" -}}
{{- if .Values.mlflow.enabled -}}
{{- printf "http://%s-mlflow:5000" (include "lingbot.fullname" .) -}}
{{- else -}}
{{- required "mlflow.externalUri is required when mlflow.enabled is false" .Values.mlflow.externalUri -}}
{{- end -}}
{{- end -}}

{{/*
The predictor of one task's policy endpoint (main or canary). Call with
(dict "root" $ "task" $task "alias" "<registry alias>" "variant" "main|canary").
*/}}
{{- define "lingbot.policyPredictor" -}}
{{- $root := .root -}}
{{- $p := $root.Values.policy -}}
{{- $task := .task -}}
{{- $gpus := $p.gpus -}}
{{- if hasKey $task "gpus" }}{{ $gpus = $task.gpus }}{{ end -}}
{{- $resources := deepCopy (default $p.resources $task.resources) -}}
{{- if gt (int $gpus) 0 -}}
{{- $_ := set $resources.requests "nvidia.com/gpu" (toString $gpus) -}}
{{- $_ := set $resources.limits "nvidia.com/gpu" (toString $gpus) -}}
{{- end -}}
{{- $settings := merge (deepCopy (default dict $task.settings)) (deepCopy $p.settings) -}}
serviceAccountName: {{ include "lingbot.fullname" $root }}-policy
automountServiceAccountToken: false
labels:
  platform.lingbot-va.io/task: {{ $task.name }}
  platform.lingbot-va.io/variant: {{ .variant }}
{{- include "lingbot.imagePullSecrets" $root }}
securityContext:
  {{- include "lingbot.podSecurityContext" 10001 | nindent 2 }}
{{- if $p.edge.enabled }}
nodeSelector:
  {{- toYaml $p.edge.nodeSelector | nindent 2 }}
tolerations:
  {{- toYaml $p.edge.tolerations | nindent 2 }}
{{- end }}
{{- with $p.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
model:
  {{- /* the ServingRuntime <fullname> (policy.yaml) runs it: its kserve-container, patched by the fields below */}}
  name: ""
  modelFormat:
    name: lingbot-va
  protocolVersion: v2
  {{- if eq .variant "main" }}
  {{- /* KServe wants a model location on the stable predictor of an endpoint with a canary (validateCanarySpecs):
  the storage initializer fetches this registered version's pyfunc descriptor over MLflow's artifact proxy; a
  canary, merged over the stable predictor by KServe, inherits it */}}
  storageUri: {{ printf "%s/model-versions/get-artifact?name=%s%s&version=%s&path=python_model.pkl" (trimSuffix "/" (default (include "lingbot.mlflowUri" $root) $p.trackingUri)) $p.modelPrefix $task.name (default $p.modelVersion $task.modelVersion) | quote }}
  {{- end }}
  args:
    - --model
    - {{ printf "models:/%s%s@%s" $p.modelPrefix $task.name .alias | quote }}
  env:
    - name: LINGBOT_SERVE_TRACKING_URI
      value: {{ default (include "lingbot.mlflowUri" $root) $p.trackingUri | quote }}
    - name: LINGBOT_SERVE_DEVICE
      value: {{ ternary "cuda" "cpu" (gt (int $gpus) 0) }}
    - name: LINGBOT_SERVE_TOKEN
      valueFrom:
        secretKeyRef:
          name: {{ include "lingbot.tokenSecret" $root }}
          key: {{ $p.tokenSecret.key }}
    {{- range $key := keys $settings | sortAlpha }}
    - name: {{ printf "LINGBOT_SERVE_%s" ($key | snakecase | upper) }}
      value: {{ get $settings $key | toString | quote }}
    {{- end }}
  resources:
    {{- toYaml $resources | nindent 4 }}
{{- end -}}

{{/*
The ServingRuntime of LingBot-VA models (modelFormat lingbot-va, auto-selected): pipelines/cluster/manifests.py's
serving_runtime, which the tests compare it with.
*/}}
{{- define "lingbot.servingRuntime" -}}
{{- $p := .Values.policy -}}
apiVersion: serving.kserve.io/v1alpha1
kind: ServingRuntime
metadata:
  name: {{ include "lingbot.fullname" . }}
  labels:
    {{- include "lingbot.labels" (dict "root" . "name" "lingbot-policy") | nindent 4 }}
    app.kubernetes.io/component: policy-server
spec:
  supportedModelFormats:
    - name: lingbot-va
      autoSelect: true
  protocolVersions: [v2, grpc-v2]
  containers:
    - name: kserve-container
      {{- include "lingbot.image" $p.image | nindent 6 }}
      command: [lingbot, serve]
      args: [--http_port, "8080", --grpc_port, "8081"]
      env:
        - name: LINGBOT_SERVE_HOST
          value: 0.0.0.0
        - name: LINGBOT_SERVE_DATA_DIR
          value: /var/lib/lingbot
        - name: HOME
          value: /tmp
      ports:
        - name: http1
          containerPort: 8080
          protocol: TCP
        - name: h2c
          containerPort: 8081
          protocol: TCP
      startupProbe:
        httpGet:
          path: /v2/health/live
          port: 8080
        periodSeconds: 10
        failureThreshold: 60
      readinessProbe:
        httpGet:
          path: /v2/health/ready
          port: 8080
        periodSeconds: 10
      livenessProbe:
        httpGet:
          path: /v2/health/live
          port: 8080
        periodSeconds: 20
      securityContext:
        {{- include "lingbot.containerSecurityContext" . | nindent 8 }}
      volumeMounts:
        - name: data
          mountPath: /var/lib/lingbot
        - name: tmp
          mountPath: /tmp
  volumes:
    - name: data
      emptyDir:
        sizeLimit: {{ $p.dataVolumeSize }}
    - name: tmp
      emptyDir: {}
{{- end -}}

{{/* MinIO policy of the platform user: the configured buckets only. */}}
{{- define "lingbot.minioPolicy" -}}
{{- $buckets := list -}}
{{- $objects := list -}}
{{- range .Values.minio.buckets -}}
{{- $buckets = append $buckets (printf "arn:aws:s3:::%s" .) -}}
{{- $objects = append $objects (printf "arn:aws:s3:::%s/*" .) -}}
{{- end -}}
{{- $statements := list
  (dict "Effect" "Allow" "Resource" $buckets
        "Action" (list "s3:GetBucketLocation" "s3:ListBucket" "s3:ListBucketMultipartUploads"))
  (dict "Effect" "Allow" "Resource" $objects
        "Action" (list "s3:GetObject" "s3:PutObject" "s3:DeleteObject" "s3:AbortMultipartUpload"
                       "s3:ListMultipartUploadParts")) -}}
{{- dict "Version" "2012-10-17" "Statement" $statements | toPrettyJson -}}
{{- end -}}

{{/* Feast feature_store.yaml of the cluster (as infra/kustomize/base/files/feature_store.yaml). */}}
{{- define "lingbot.feastStore" -}}
{{- $host := include "lingbot.postgresHost" . -}}
project: {{ .Values.feast.project }}
provider: local
registry:
  registry_type: sql
  path: postgresql+psycopg://feast:${FEAST_DB_PASSWORD}@{{ $host }}:{{ .Values.postgres.port }}/feast
  cache_ttl_seconds: 60
  sqlalchemy_config_kwargs:
    pool_pre_ping: true
online_store:
  type: postgres
  host: {{ $host }}
  port: {{ .Values.postgres.port }}
  database: feast
  db_schema: public
  user: feast
  password: ${FEAST_DB_PASSWORD}
  sslmode: {{ ternary "disable" "require" .Values.postgres.enabled }}
offline_store:
  type: file
entity_key_serialization_version: 3
{{- end -}}

{{/*
One egress rule to a component: its pods when it is in-cluster, else only its port (external address).
Call with (dict "root" $ "name" "<component>" "enabled" <bool> "port" <in-cluster port> "externalPort" <port>).
*/}}
{{- define "lingbot.egressTo" -}}
{{- if .enabled -}}
- to:
    - podSelector:
        matchLabels:
          {{- include "lingbot.selectorLabels" (dict "root" .root "name" .name) | nindent 10 }}
  ports:
    - protocol: TCP
      port: {{ .port }}
{{- else -}}
- ports:
    - protocol: TCP
      port: {{ .externalPort }}
{{- end -}}
{{- end -}}

{{/* Peers selected by the labels their controllers set (Argo, the training operator, KServe). */}}
{{- define "lingbot.argoPods" -}}
- podSelector:
    matchExpressions:
      - {key: workflows.argoproj.io/workflow, operator: Exists}
{{- end -}}
{{- define "lingbot.trainingPods" -}}
- podSelector:
    matchExpressions:
      - {key: training.kubeflow.org/job-name, operator: Exists}
{{- end -}}
{{- define "lingbot.policyPods" -}}
- podSelector:
    matchExpressions:
      - {key: serving.kserve.io/inferenceservice, operator: Exists}
{{- end -}}

{{/* Egress of pipeline pods to the platform services (MLflow, S3, Feast). */}}
{{- define "lingbot.serviceEgress" -}}
{{- $v := .Values -}}
{{ include "lingbot.egressTo" (dict "root" . "name" "mlflow" "enabled" $v.mlflow.enabled "port" 5000 "externalPort" $v.mlflow.externalPort) }}
{{ include "lingbot.egressTo" (dict "root" . "name" "minio" "enabled" $v.minio.enabled "port" 9000 "externalPort" $v.minio.externalPort) }}
{{- if $v.feast.enabled }}
{{ include "lingbot.egressTo" (dict "root" . "name" "feast" "enabled" true "port" 6566) }}
{{- end }}
{{- end -}}
