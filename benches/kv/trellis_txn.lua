-- wrk script: bulk KV loading through Trellis transactions, 64 new keys per
-- request (Consul's most operations per transaction).
--   PUT /v1/txn   body: [{"KV":{"Verb":"set","Key":...,"Value":<base64>}}, ...]
-- Usage: wrk -s benches/kv/trellis_txn.lua http://127.0.0.11:8500
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "common.lua")

local encoded = bench.base64(bench.value)

function request()
  local base = bench.next_key()
  local ops = {}
  for i = 1, 64 do
    ops[i] = '{"KV":{"Verb":"set","Key":"' .. base .. "_" .. i .. '","Value":"' .. encoded .. '"}}'
  end
  return wrk.format("PUT", "/v1/txn", { ["Content-Type"] = "application/json" }, "[" .. table.concat(ops, ",") .. "]")
end
