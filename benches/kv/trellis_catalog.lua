-- wrk script: catalog registrations against Trellis, each a new node with one
-- service and one node check (the shape Consul's scale tests register).
--   PUT /v1/catalog/register
-- Usage: wrk -s benches/kv/trellis_catalog.lua http://127.0.0.11:8500
-- The node addresses are data only: nothing ever connects to them.
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "common.lua")

function request()
  local node = bench.next_key():gsub("/", "-")
  local body = '{"Node":"' .. node .. '","Address":"10.1.2.3",'
    .. '"Service":{"ID":"web-1","Service":"web","Port":8080,"Tags":["v1"]},'
    .. '"Check":{"CheckID":"node-ok","Name":"node ok","Status":"passing"}}'
  return wrk.format("PUT", "/v1/catalog/register", { ["Content-Type"] = "application/json" }, body)
end
