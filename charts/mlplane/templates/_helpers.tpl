{{/*
Chart name, overridable with nameOverride.
*/}}
{{- define "mlplane.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name of the release's objects: fullnameOverride, else the release name
when it contains the chart name, else "<release>-<chart>". Truncated to 63
characters (DNS label). For the release "mlplane" this is "mlplane".
*/}}
{{- define "mlplane.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "mlplane.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels of the operator pods (stable across upgrades).
*/}}
{{- define "mlplane.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mlplane.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
Labels of every object the chart renders.
*/}}
{{- define "mlplane.labels" -}}
helm.sh/chart: {{ include "mlplane.chart" . }}
{{ include "mlplane.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: mlplane
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Labels of the workspace ClusterRoles: shared by every install, so no
instance/component labels.
*/}}
{{- define "mlplane.workspaceRoleLabels" -}}
helm.sh/chart: {{ include "mlplane.chart" . }}
app.kubernetes.io/name: {{ include "mlplane.name" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: mlplane
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Name of the operator's ServiceAccount.
*/}}
{{- define "mlplane.serviceAccountName" -}}
{{- default (include "mlplane.fullname" .) .Values.serviceAccount.name }}
{{- end }}

{{/*
Name of the leader election Lease ("mlplane-operator" for the release "mlplane",
the operator's built-in default).
*/}}
{{- define "mlplane.leaseName" -}}
{{- printf "%s-operator" (include "mlplane.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Operator image reference.
*/}}
{{- define "mlplane.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/*
Refuses value combinations that would break the operator.
*/}}
{{- define "mlplane.validate" -}}
{{- if and (gt (int .Values.replicaCount) 1) (not .Values.leaderElection.enabled) }}
{{- fail "replicaCount > 1 requires leaderElection.enabled=true (only the Lease holder may write)" }}
{{- end }}
{{- if ge (int .Values.leaderElection.leaseGrace) (int .Values.leaderElection.leaseDuration) }}
{{- fail "leaderElection.leaseGrace must be smaller than leaderElection.leaseDuration" }}
{{- end }}
{{- if not (has .Values.logFormat (list "json" "text")) }}
{{- fail "logFormat must be json or text" }}
{{- end }}
{{- end }}

{{/*
Tracking server: name, and selector labels distinct from the operator's.
*/}}
{{- define "mlplane.trackingName" -}}
{{- printf "%s-tracking" (include "mlplane.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- define "mlplane.trackingSelectorLabels" -}}
app.kubernetes.io/name: {{ include "mlplane.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: tracking
{{- end }}
{{- define "mlplane.trackingLabels" -}}
helm.sh/chart: {{ include "mlplane.chart" . }}
{{ include "mlplane.trackingSelectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: mlplane
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}
