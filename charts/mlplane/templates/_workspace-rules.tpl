{{/*
Rules shared by the workspace ClusterRoles (workspace-clusterroles.yaml).
Indented as items of `rules:`.
*/}}

{{/*
Read access to what runs produce: status of the mlplane kinds, pods and their
logs, services, events, PVCs and Jobs.
*/}}
{{- define "mlplane.workspaceRules.observe" }}
  - apiGroups: ["mlplane.io"]
    resources: [experiments/status, pipelines/status, dataassets/status, modeldeployments/status]
    verbs: [get]
  - apiGroups: [""]
    resources: [pods, pods/log, services, events, persistentvolumeclaims]
    verbs: [get, list, watch]
  - apiGroups: ["batch"]
    resources: [jobs]
    verbs: [get, list, watch]
{{- end }}

{{/*
Contributor: every verb on the namespaced mlplane kinds, the observe rules, and
Secrets/ConfigMaps for data and artifact-store credentials.
*/}}
{{- define "mlplane.workspaceRules.contribute" }}
  - apiGroups: ["mlplane.io"]
    resources: [experiments, pipelines, dataassets, modeldeployments]
    verbs: [get, list, watch, create, update, patch, delete, deletecollection]
{{- include "mlplane.workspaceRules.observe" . }}
  - apiGroups: [""]
    resources: [secrets, configmaps]
    verbs: [get, list, watch, create, update, patch, delete]
{{- end }}
