{{/* Chart name, overridable. */}}
{{- define "agentid.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Resource name prefix: the release name, or "<release>-<chart>" when it lacks the chart name. */}}
{{- define "agentid.fullname" -}}
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

{{- define "agentid.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Names of the two components' resources (suffixes keep them under 63 characters). */}}
{{- define "agentid.serverName" -}}
{{- printf "%s-server" (include "agentid.fullname" . | trunc 56 | trimSuffix "-") }}
{{- end }}
{{- define "agentid.nodeName" -}}
{{- printf "%s-node" (include "agentid.fullname" . | trunc 58 | trimSuffix "-") }}
{{- end }}

{{/* Standard labels; call with (dict "ctx" $ "component" "server"). */}}
{{- define "agentid.labels" -}}
helm.sh/chart: {{ include "agentid.chart" .ctx }}
{{ include "agentid.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: agentid
{{- end }}

{{/* Labels that select a component's pods; they must never change across upgrades. */}}
{{- define "agentid.selectorLabels" -}}
app.kubernetes.io/name: {{ include "agentid.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "agentid.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
The trust domain, checked here so a typo fails at install time rather than in the server's log:
SPIFFE allows lowercase letters, digits, '.', '-' and '_' (at most 255).
*/}}
{{- define "agentid.trustDomain" -}}
{{- $td := required "trustDomain is required, e.g. --set trustDomain=prod.example.com" .Values.trustDomain }}
{{- if or (gt (len $td) 255) (not (regexMatch "^[a-z0-9._-]+$" $td)) }}
{{- fail (printf "trustDomain %q is not a SPIFFE trust domain name (lowercase letters, digits, '.', '-', '_'; at most 255)" $td) }}
{{- end }}
{{- $td }}
{{- end }}

{{- define "agentid.clusterName" -}}
{{- required "clusterName is required (the node daemon states it in every composite identity)" .Values.clusterName }}
{{- end }}

{{/* The node API as node daemons reach it: the server Service's cluster DNS name. */}}
{{- define "agentid.serverURL" -}}
{{- printf "https://%s.%s.svc:%d" (include "agentid.serverName" .) .Release.Namespace (int .Values.server.listenPort) }}
{{- end }}

{{/* Fixed names the server uses with --store kubernetes (the Role grants exactly these). */}}
{{- define "agentid.keysSecret" -}}agentid-server-keys{{- end }}
{{- define "agentid.joinTokensSecret" -}}agentid-join-tokens{{- end }}
{{- define "agentid.bundleConfigMap" -}}agentid-bundle{{- end }}
{{- define "agentid.lease" -}}agentid-server{{- end }}

{{/* Paths inside the node daemon's container. */}}
{{- define "agentid.nodeTokenDir" -}}/var/run/secrets/agentid{{- end }}
{{- define "agentid.nodeBundleDir" -}}/etc/agentid/bundle{{- end }}
{{- define "agentid.serverAdminSocketDir" -}}/run/agentid-server{{- end }}
