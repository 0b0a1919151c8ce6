-- wrk script: writes against etcd's v3 JSON gateway.
--   POST /v3/kv/put   {"key": base64(<prefix>t<thread>_<n>), "value": base64(value)}
-- Usage: wrk -s benches/kv/etcd_put.lua http://127.0.0.31:2379
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "common.lua")

local value_b64 = bench.base64(bench.value)
local headers = { ["Content-Type"] = "application/json" }

function request()
  local body = '{"key":"' .. bench.base64(bench.next_key()) .. '","value":"' .. value_b64 .. '"}'
  return wrk.format("POST", "/v3/kv/put", headers, body)
end
