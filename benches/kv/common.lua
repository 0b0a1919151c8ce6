-- Shared by trellis_put.lua and etcd_put.lua (loaded with dofile from the
-- same directory). Each wrk thread has its own Lua state: setup() runs in
-- the main state once per thread and hands every thread a distinct id, so
-- that keys are "<prefix><thread id>_<per-thread counter>" and never repeat.
--
-- Environment (read by every thread):
--   KV_BENCH_PREFIX      key prefix (default "bench/")
--   KV_BENCH_VALUE_SIZE  value size in bytes (default 128)

bench = {}

bench.prefix = os.getenv("KV_BENCH_PREFIX") or "bench/"
bench.value_size = tonumber(os.getenv("KV_BENCH_VALUE_SIZE") or "128")

-- The same value bytes for both systems: a repeating printable pattern.
local pattern = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ+-"
bench.value = string.rep(pattern, math.ceil(bench.value_size / #pattern)):sub(1, bench.value_size)

local b64chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

-- Standard base64 (RFC 4648, padded); LuaJIT has no built-in encoder.
function bench.base64(s)
  local out = {}
  local n = #s
  for i = 1, n, 3 do
    local a, b, c = s:byte(i, i + 2)
    local v = a * 65536 + (b or 0) * 256 + (c or 0)
    local c1 = math.floor(v / 262144) % 64
    local c2 = math.floor(v / 4096) % 64
    local c3 = math.floor(v / 64) % 64
    local c4 = v % 64
    out[#out + 1] = b64chars:sub(c1 + 1, c1 + 1)
    out[#out + 1] = b64chars:sub(c2 + 1, c2 + 1)
    out[#out + 1] = b and b64chars:sub(c3 + 1, c3 + 1) or "="
    out[#out + 1] = c and b64chars:sub(c4 + 1, c4 + 1) or "="
  end
  return table.concat(out)
end

-- Main state: number the threads.
local thread_count = 0
local all_threads = {}

function setup(thread)
  thread_count = thread_count + 1
  thread:set("tid", thread_count)
  all_threads[#all_threads + 1] = thread
end

-- Thread state: the per-thread counter. `tid` was set by setup().
-- wrk calls request() once on thread 1 before the run to check for
-- pipelining and discards that request, so key "<prefix>t1_1" is never
-- sent; "<prefix>t1_2" is the first key written.
counter = 0

function bench.next_key()
  counter = counter + 1
  return bench.prefix .. "t" .. tostring(tid) .. "_" .. tostring(counter)
end

-- Main state, after the run: one parseable line. Latencies from wrk are in
-- microseconds; summary.errors.status counts responses with status > 399.
function done(summary, latency, requests)
  local e = summary.errors
  local dur_s = summary.duration / 1e6
  local rps = 0
  if dur_s > 0 then rps = summary.requests / dur_s end
  local sent = 0
  for _, t in ipairs(all_threads) do
    sent = sent + (tonumber(t:get("counter")) or 0)
  end
  io.write(string.format(
    "BENCH_RESULT requests=%d sent=%d duration_s=%.3f rps=%.1f p50_ms=%.3f p90_ms=%.3f p99_ms=%.3f max_ms=%.3f non2xx=%d connect_err=%d read_err=%d write_err=%d timeout_err=%d\n",
    summary.requests, sent, dur_s, rps,
    latency:percentile(50) / 1000, latency:percentile(90) / 1000,
    latency:percentile(99) / 1000, latency.max / 1000,
    e.status, e.connect, e.read, e.write, e.timeout))
end
