-- wrk script: Consul-style KV writes against Trellis.
--   PUT /v1/kv/<prefix>t<thread>_<n>   body: the raw value bytes
-- Usage: wrk -s benches/kv/trellis_put.lua http://127.0.0.11:8500
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "common.lua")

function request()
  return wrk.format("PUT", "/v1/kv/" .. bench.next_key(), nil, bench.value)
end
