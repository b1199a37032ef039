-- Commit, adjust or refund a reservation: add actual - reserved to each counter, where the
-- reservation put it; once per reservation id (plangate).
--
-- KEYS[1..n]  the counters of the reservation
-- KEYS[n+1]   the reservation's settled marker
--   then per credit balance: its hash and its ledger
-- ARGV[1]     now, epoch seconds
-- ARGV[2]     how long the marker is kept, seconds; with credits or usage,
--   " <number of balances>", and with usage " <seconds>": the last KEY is the hour's usage
--   aggregates (see usage_add), which expires that many seconds from now when it is made
-- then per counter, 6 values: window seconds (0: a period), period end (epoch seconds),
--   slot (the log entry's seq, or the bucket), delta (may be negative), the log's bound
--   (0: buckets), and the meter whose usage the delta changes ("": none)
-- then per balance: "delta grant start finish" and the reservation's burns of it
--   (" id units..."): a delta above 0 is charged (past the balance: debt), below 0 refunded
--   to the grants the burns took it from
--
-- Returns 1, or 0 if this reservation was settled before (then nothing changes).

local ttl, ncredits, usage_ttl = string.match(ARGV[2], "^(%d+) ?(%d*) ?(%d*)$")
ncredits = tonumber(ncredits) or 0
usage_ttl = tonumber(usage_ttl) or 0
local n = #KEYS - 1 - 2 * ncredits - (usage_ttl > 0 and 1 or 0)
local now = tonumber(ARGV[1])
if redis.call("EXISTS", KEYS[n + 1]) == 1 then
  return 0
end

-- The entry `seq` of a log changes by `delta` (never below 0), unless it has left the
-- window; if it was dropped (it held no units), the next newer entry takes the change.
local function log_settle(key, window, seq, delta, bound)
  local log = log_open(key, window, now, ARGV[1], true)
  if log == nil then
    return -- buckets now (a plan changed): where the reservation was is not known
  end
  if seq <= log.evicted then
    log_flush(log)
    return
  end
  local index, found = 1, nil
  while found == nil and index <= log.n do -- newest first: a settle usually follows soon
    local chunk = redis.call("LRANGE", key, index, index + 31)
    for j, text in ipairs(chunk) do
      local entry_seq = log_entry(text)
      if entry_seq < seq then -- passed it: it was dropped
        found = index + j - 2
        break
      elseif entry_seq == seq then
        found = index + j - 1
        break
      end
    end
    index = index + 32
  end
  found = found or log.n -- every entry is newer: the oldest is the next newer
  if found == 0 then -- no newer entry: counted now, later than it was used
    if delta > 0 then
      log_add(log, log.t, log.t_text, delta, bound)
      log_expire(log, now)
    end
    log_flush(log)
    return
  end
  local entry_seq, _, held, time_text = log_entry(redis.call("LINDEX", key, found))
  delta = math.max(delta, -held)
  if delta ~= 0 then
    redis.call("LSET", key, found, string.format("%d %s %d", entry_seq, time_text, held + delta))
    log.total = log.total + delta
    log.dirty = true
  end
  log_flush(log)
end

-- Units given back to a log that was buckets when they were counted (a plan changed the
-- limit; a lease's units, storage/_leases.py): taken from the oldest entries, so that every
-- unit still counted counts at least as long as before; nothing once their bucket has left
-- the window (the units left with it).
local function log_give_back(key, window, slot, units)
  local log = log_open(key, window, now, ARGV[1], true)
  if log == nil then
    return
  end
  if (tonumber(slot) + 1) * window / __SLIDING_BUCKETS__ + window <= log.t then
    log_flush(log)
    return
  end
  local index = log.n
  while units > 0 and index >= 1 do
    local seq, _, held, time_text = log_entry(redis.call("LINDEX", key, index))
    local take = math.min(held, units)
    if take > 0 then
      redis.call("LSET", key, index, string.format("%d %s %d", seq, time_text, held - take))
      log.total = log.total - take
      log.dirty = true
      units = units - take
    end
    index = index - 1
  end
  log_flush(log)
end

for i = 1, n do
  local base = 2 + (i - 1) * 6
  local key = KEYS[i]
  local window = tonumber(ARGV[base + 1])
  local resets = tonumber(ARGV[base + 2])
  local slot = ARGV[base + 3]
  local delta = tonumber(ARGV[base + 4])
  local bound = tonumber(ARGV[base + 5])
  local meter = ARGV[base + 6]
  if usage_ttl > 0 and meter ~= "" and delta ~= 0 then -- the usage as it was, unclamped
    usage_add(KEYS[#KEYS], meter, delta, usage_ttl)
  end
  if delta ~= 0 then
    if window > 0 and bound > 0 then
      log_settle(key, window, tonumber(slot), delta, bound)
    elseif window > 0 then
      -- A bucket already out of the window (or an expired counter) stays out; a refund never
      -- takes more than the bucket holds.
      local held = redis.pcall("HGET", key, slot) -- an error: a log now (a plan changed)
      if type(held) == "string" then
        local change = math.max(delta, -tonumber(held))
        if change ~= 0 then -- never "-0", which HINCRBY refuses
          redis.call("HINCRBY", key, slot, string.format("%d", change))
        end
      elseif type(held) == "table" and delta < 0 then
        log_give_back(key, window, slot, -delta)
      end
    elseif resets > now then
      local held = tonumber(redis.call("GET", key) or "0")
      if held > 0 or delta > 0 then
        local ttl = math.max(1, math.ceil((resets - now) * 1000))
        redis.call("SET", key, math.max(0, held + delta), "PX", ttl)
      end
    end
  end
end
if ncredits > 0 then
  local now_us = math.floor(now * 1000000 + 0.5)
  local ref = string.match(KEYS[n + 1], ":settled:(.*)$")
  for j = 1, ncredits do
    local spec = ARGV[2 + 6 * n + j]
    local delta = tonumber(string.match(spec, "^(%S+)"))
    if delta ~= 0 then
      local key = KEYS[n + 1 + 2 * j - 1]
      local a = credit_open_for(key, KEYS[n + 1 + 2 * j], spec, now_us)
      if delta > 0 then
        credit_take_excess(a, delta, now_us, ref)
      else
        local burns = {}
        for id, units in string.gmatch(string.match(spec, "^%S+ %S+ %S+ %S+(.*)$"), "(%S+) (%d+)") do
          burns[#burns + 1] = id
          burns[#burns + 1] = tonumber(units)
        end
        if #burns == 0 then -- made while this process timed out: its burns are in the ledger
          burns = credit_burned(KEYS[n + 1 + 2 * j], ref) or {}
        end
        credit_refund(a, burns, -delta, now_us, ref)
      end
      credit_save(a)
    end
  end
end
-- last: a script that failed half-way is not rolled back, but it can be retried
redis.call("SET", KEYS[n + 1], "1", "EX", ttl)
return 1
