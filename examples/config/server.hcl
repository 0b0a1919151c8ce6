# A server of a three-server datacenter. Start three of these with their own node_name,
# bind_addr and data_dir.
datacenter       = "dc1"
node_name        = "s1"
data_dir         = "/opt/trellis/data"
server           = true
bootstrap_expect = 3
bind_addr        = "10.0.0.11"
client_addr      = "127.0.0.1"
retry_join       = ["10.0.0.12", "10.0.0.13"]
log_level        = "info"

ports {
  http   = 8500
  dns    = 8600
  server = 8300
}

tls {
  defaults {
    ca_file   = "/etc/trellis/tls/trellis-agent-ca.pem"
    cert_file = "/etc/trellis/tls/dc1-server-trellis-0.pem"
    key_file  = "/etc/trellis/tls/dc1-server-trellis-0-key.pem"
  }
}

performance {
  raft_multiplier = 1
}

autopilot {
  cleanup_dead_servers = true
  last_contact_threshold = "200ms"
}
