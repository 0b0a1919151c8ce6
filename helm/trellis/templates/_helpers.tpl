{{/* The prefix of every object's name. */}}
{{- define "trellis.fullname" -}}
{{- if .Values.global.name -}}
{{- .Values.global.name | trunc 50 | trimSuffix "-" -}}
{{- else if contains "trellis" .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-trellis" .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "trellis.labels" -}}
app.kubernetes.io/name: trellis
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
trellis.io/datacenter: {{ .Values.global.datacenter }}
{{- end -}}

{{/* Selector labels of one component: server, client or mesh-gateway. */}}
{{- define "trellis.selector" -}}
app.kubernetes.io/name: trellis
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "trellis.serverService" -}}{{ include "trellis.fullname" . }}-server{{- end -}}

{{/* The servers' stable DNS names (the headless Service gives each pod one). */}}
{{- define "trellis.serverAddresses" -}}
{{- $svc := include "trellis.serverService" . -}}
{{- $names := list -}}
{{- range $i := until (int .Values.server.replicas) -}}
{{- $names = append $names (printf "%s-%d.%s.%s.svc" $svc $i $svc $.Release.Namespace) -}}
{{- end -}}
{{- toJson $names -}}
{{- end -}}

{{/* Where the CA certificate and key come from: the user's Secrets, or the generated one. */}}
{{- define "trellis.caCertSecret" -}}{{ .Values.global.tls.caCert.secretName | default (printf "%s-ca" (include "trellis.fullname" .)) }}{{- end -}}
{{- define "trellis.caCertKey" -}}{{ if .Values.global.tls.caCert.secretName }}{{ .Values.global.tls.caCert.secretKey }}{{ else }}tls.crt{{ end }}{{- end -}}
{{- define "trellis.caKeySecret" -}}{{ .Values.global.tls.caKey.secretName | default (printf "%s-ca" (include "trellis.fullname" .)) }}{{- end -}}
{{- define "trellis.caKeyKey" -}}{{ if .Values.global.tls.caKey.secretName }}{{ .Values.global.tls.caKey.secretKey }}{{ else }}tls.key{{ end }}{{- end -}}

{{/* The gossip key's Secret and key; empty when gossip is not encrypted. */}}
{{- define "trellis.gossipSecret" -}}
{{- if .Values.global.gossipEncryption.secretName -}}{{ .Values.global.gossipEncryption.secretName }}
{{- else if .Values.global.gossipEncryption.autoGenerate -}}{{ include "trellis.fullname" . }}-gossip-key
{{- end -}}
{{- end -}}
{{- define "trellis.gossipKey" -}}{{ if .Values.global.gossipEncryption.secretName }}{{ .Values.global.gossipEncryption.secretKey }}{{ else }}key{{ end }}{{- end -}}

{{/* "ip:port" with IPv6 addresses in brackets. */}}
{{- define "trellis.hostPort" -}}
{{- if and (contains ":" .host) (not (hasPrefix "[" .host)) -}}[{{ .host }}]:{{ .port }}{{- else -}}{{ .host }}:{{ .port }}{{- end -}}
{{- end -}}

{{/* The load balancer's address of the mesh gateway Service (an IP, else a host name), read
from the cluster; empty when it has none yet or when rendering without a cluster. */}}
{{- define "trellis.gatewayLoadBalancer" -}}
{{- $svc := lookup "v1" "Service" .Release.Namespace (printf "%s-mesh-gateway" (include "trellis.fullname" .)) -}}
{{- $ingress := dig "status" "loadBalancer" "ingress" list $svc -}}
{{- if $ingress -}}
{{- $first := first $ingress -}}{{ $first.ip | default $first.hostname }}
{{- end -}}
{{- end -}}

{{/* The address the gateways advertise to other datacenters (--wan-address): an IP and port,
since `trellis gateway mesh` takes no host name there. With source Service and no load
balancer IP yet (or a load balancer known by name only), the pod's own address, until a
helm upgrade finds one (NOTES.txt says so). */}}
{{- define "trellis.gatewayWanAddress" -}}
{{- $gw := .Values.meshGateway -}}
{{- if eq $gw.wanAddress.source "Static" -}}
{{- $ip := required "meshGateway.wanAddress.static is required with source Static" $gw.wanAddress.static -}}
{{- if not (regexMatch "^([0-9]{1,3}[.]){3}[0-9]{1,3}$|^[0-9a-fA-F:]*:[0-9a-fA-F:.]*$" $ip) -}}
{{- fail (printf "meshGateway.wanAddress.static must be an IP address (the gateway advertises an IP), not %q" $ip) -}}
{{- end -}}
{{- include "trellis.hostPort" (dict "host" $ip "port" $gw.wanAddress.port) -}}
{{- else if eq $gw.wanAddress.source "NodeIP" -}}
$(HOST_IP):{{ $gw.wanAddress.port }}
{{- else if eq $gw.wanAddress.source "Service" -}}
{{- $lb := include "trellis.gatewayLoadBalancer" . -}}
{{- if and $lb (regexMatch "^[0-9.]+$|:" $lb) -}}
{{- include "trellis.hostPort" (dict "host" $lb "port" $gw.service.port) -}}
{{- else -}}
$(POD_IP):{{ $gw.containerPort }}
{{- end -}}
{{- else -}}
{{- fail (printf "meshGateway.wanAddress.source must be Service, NodeIP or Static, not %q" $gw.wanAddress.source) -}}
{{- end -}}
{{- end -}}

{{/* Where secondaries find this (primary) datacenter's gateways: primary_gateways of the
federation secret ("host:port"; names are allowed and re-resolved). */}}
{{- define "trellis.gatewayFederationAddress" -}}
{{- $gw := .Values.meshGateway -}}
{{- if eq $gw.wanAddress.source "Static" -}}
{{- include "trellis.gatewayWanAddress" . -}}
{{- else if eq $gw.wanAddress.source "Service" -}}
{{- $lb := include "trellis.gatewayLoadBalancer" . -}}
{{- include "trellis.hostPort" (dict "host" ($lb | default (printf "%s-mesh-gateway.%s.svc" (include "trellis.fullname" .) .Release.Namespace)) "port" $gw.service.port) -}}
{{- else if eq $gw.wanAddress.source "NodeIP" -}}
{{- fail "global.federation.createFederationSecret with meshGateway.wanAddress.source NodeIP: the nodes the gateways will run on are not known when rendering, so the secret cannot name them in primary_gateways; use source Static or Service in the primary, or create the federation secret by hand (docs/federation-vm-kubernetes.md)" -}}
{{- else -}}
{{- include "trellis.gatewayWanAddress" . -}}
{{- end -}}
{{- end -}}

{{- define "trellis.imagePullSecrets" -}}
{{- with .Values.global.imagePullSecrets }}
imagePullSecrets:
{{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Environment every agent container has: its pod's identity and the gossip key. */}}
{{- define "trellis.agentEnv" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
- name: HOST_IP
  valueFrom:
    fieldRef:
      fieldPath: status.hostIP
- name: NODE_NAME
  valueFrom:
    fieldRef:
      fieldPath: spec.nodeName
{{- if include "trellis.gossipSecret" . }}
- name: GOSSIP_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "trellis.gossipSecret" . }}
      key: {{ include "trellis.gossipKey" . }}
{{- end }}
{{- end -}}

{{/* Readiness: the agent serves its HTTP API and knows the leader of its datacenter. */}}
{{- define "trellis.leaderProbe" -}}
readinessProbe:
  exec:
    command:
      - /bin/sh
      - -ec
      - curl -sf http://127.0.0.1:8500/v1/status/leader | grep -E '".+"'
  initialDelaySeconds: 2
  periodSeconds: 5
  timeoutSeconds: 5
  failureThreshold: 2
{{- end -}}
