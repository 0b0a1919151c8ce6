-- wrk script: overwrites of a fixed set of keys (KV_BENCH_KEYS, default 1000),
-- each thread cycling through all of them.
--   PUT /v1/kv/<prefix><n mod keys>   body: the raw value bytes
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "common.lua")

local keys = tonumber(os.getenv("KV_BENCH_KEYS") or "1000")

function request()
  counter = counter + 1
  return wrk.format("PUT", "/v1/kv/" .. bench.prefix .. tostring((counter + tid * 7919) % keys), nil, bench.value)
end
