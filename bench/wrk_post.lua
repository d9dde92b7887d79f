-- wrk script: POST one JSON body, verify every response, print one JSON summary line.
--
--   BENCH_BODY_FILE=body.json BENCH_AUTH=key BENCH_EXPECT=$'[DONE]\tcompletion_tokens' \
--     wrk -t2 -c32 -d6s -s bench/wrk_post.lua http://127.0.0.1:8080/v1/chat/completions
--
-- A response counts as good only if its status is 200 and its body contains every
-- tab-separated string of BENCH_EXPECT. The last line printed starts with "WRKJSON ".
-- Optional: BENCH_HEADERS, tab-separated "Name: value" headers added to every request
-- (e.g. $'anthropic-version: 2023-06-01'); BENCH_AUTH_HEADER=x-api-key sends the key
-- as "x-api-key: KEY" instead of "Authorization: Bearer KEY".

local function read_file(path)
  local f = assert(io.open(path, "rb"), "cannot open " .. tostring(path))
  local data = f:read("*a")
  f:close()
  return data
end

wrk.method = "POST"
wrk.body = read_file(os.getenv("BENCH_BODY_FILE"))
wrk.headers["Content-Type"] = "application/json"
local auth = os.getenv("BENCH_AUTH")
if auth and auth ~= "" then
  if (os.getenv("BENCH_AUTH_HEADER") or "") == "x-api-key" then
    wrk.headers["x-api-key"] = auth
  else
    wrk.headers["Authorization"] = "Bearer " .. auth
  end
end
for line in string.gmatch(os.getenv("BENCH_HEADERS") or "", "[^\t]+") do
  local name, value = string.match(line, "^%s*([^:]+):%s*(.-)%s*$")
  if name then wrk.headers[name] = value end
end

local expect = {}
for part in string.gmatch(os.getenv("BENCH_EXPECT") or "", "[^\t]+") do
  table.insert(expect, part)
end

-- Per-thread counters (globals of each thread's Lua state, read back in done()).
sent, good, non200, bad = 0, 0, 0, 0
sample = ""

local threads = {}
function setup(thread)
  table.insert(threads, thread)
end

local prepared
function init(args)
  prepared = wrk.format()
end

function request()
  sent = sent + 1
  return prepared
end

function response(status, headers, body)
  if status ~= 200 then
    non200 = non200 + 1
    if sample == "" then sample = tostring(status) .. " " .. string.sub(body or "", 1, 300) end
    return
  end
  for _, needle in ipairs(expect) do
    if not string.find(body, needle, 1, true) then
      bad = bad + 1
      if sample == "" then sample = "200 missing " .. needle .. ": " .. string.sub(body, 1, 300) end
      return
    end
  end
  good = good + 1
end

local function jstr(s)
  s = string.gsub(s, '[%c"\\]', function(c)
    if c == '"' then return '\\"' elseif c == "\\" then return "\\\\" end
    return string.format("\\u%04x", string.byte(c))
  end)
  return '"' .. s .. '"'
end

function done(summary, latency, requests)
  local t = { sent = 0, good = 0, non200 = 0, bad = 0 }
  local first = ""
  for _, thread in ipairs(threads) do
    t.sent = t.sent + thread:get("sent")
    t.good = t.good + thread:get("good")
    t.non200 = t.non200 + thread:get("non200")
    t.bad = t.bad + thread:get("bad")
    if first == "" then first = thread:get("sample") end
  end
  local e = summary.errors
  local out = string.format(
    '{"duration_us":%d,"requests":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"sent":%d,"good":%d,"non200":%d,"bad":%d,"sample":%s,' ..
    '"latency_us":{"min":%d,"mean":%.1f,"stdev":%.1f,"max":%d,' ..
    '"p50":%d,"p90":%d,"p99":%d,"p999":%d}}',
    summary.duration, summary.requests, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    t.sent, t.good, t.non200, t.bad, jstr(first),
    latency.min, latency.mean, latency.stdev, latency.max,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9))
  io.write("WRKJSON " .. out .. "\n")
end
