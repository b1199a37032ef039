-- Add usage that was admitted elsewhere (replayed after a storage outage), once per id
-- (plangate). No limit is checked: the usage happened.
--
-- KEYS[1..n]  counters (sliding windows, see window.lua, or calendar-period strings)
-- KEYS[n+1]   the replay's marker: present means this usage was recorded before
-- ARGV[1]     now, epoch seconds: when the usage happened
-- ARGV[2]     how long the marker is kept, seconds; with credits or usage,
--   " <number of balances> <reservation id or ->", and with usage " <seconds>": the last
--   KEY is the usage aggregates of the hour of ARGV[1] (see usage_add)
-- ARGV[3]     buckets per sliding window
-- then per counter, 5 values: window seconds (0: a period), period end (epoch seconds),
--   units, the log's bound (0: buckets), and the meter whose usage the units add to
--   ("": none)
-- then per credit balance (KEYS after the marker: its hash and its ledger), "units grant
--   start finish": units used meanwhile, taken whole (past the balance: debt); ARGV[2] ending
--   in " <reservation id>": the one reservation this usage is, recorded already if its burns
--   are in a ledger (its reserve timed out here but was made there)
--
-- Returns {1, slot per counter...}, {0} if this usage was recorded before, or {2} if it is
-- one reservation that was made here after all (its reply timed out): nothing changes.

local ttl, ncredits, reservation, usage_ttl =
  string.match(ARGV[2], "^(%d+) ?(%d*) ?(%S*) ?(%d*)$")
ncredits = tonumber(ncredits) or 0
usage_ttl = tonumber(usage_ttl) or 0
local n = #KEYS - 1 - 2 * ncredits - (usage_ttl > 0 and 1 or 0)
local now = tonumber(ARGV[1])
if redis.call("EXISTS", KEYS[n + 1]) == 1 then
  return {0}
end
-- the usage of one reservation whose reserve timed out here but was made there: counted
if reservation ~= nil and reservation ~= "" and reservation ~= "-" then
  for j = 1, ncredits do
    if credit_burned(KEYS[n + 1 + 2 * j], reservation) then
      return {2}
    end
  end
  -- without credits: the last reservation of the customer's hour (see reserve.lua)
  if ncredits == 0 and usage_ttl > 0 and redis.call("HGET", KEYS[#KEYS], "#last") == reservation then
    return {2}
  end
end
local nbuckets = tonumber(ARGV[3])
local reply = {1}
for i = 1, n do
  local base = 3 + (i - 1) * 5
  local key = KEYS[i]
  local window = tonumber(ARGV[base + 1])
  local resets = tonumber(ARGV[base + 2])
  local units = tonumber(ARGV[base + 3])
  local bound = tonumber(ARGV[base + 4])
  local meter = ARGV[base + 5]
  if usage_ttl > 0 and meter ~= "" and units ~= 0 then
    usage_add(KEYS[#KEYS], meter, units, usage_ttl)
  end
  local slot = 0
  if window > 0 and bound > 0 then
    local log = log_open(key, window, now, ARGV[1], true)
    if log == nil then -- buckets: a plan changed the limit
      log = log_from_buckets(key, window, window / nbuckets, now, ARGV[1], bound)
    end
    -- the window's time never goes back: late usage is counted at the latest time
    slot = log_add(log, log.t, log.t_text, units, bound)
    log_expire(log, now)
  elseif window > 0 then
    local width = window / nbuckets
    if redis.call("TYPE", key).ok == "list" then -- a log: a plan changed the limit
      buckets_from_log(key, window, width, now, ARGV[1])
    end
    -- the window's time never goes back: late usage joins the newest bucket
    local t = math.max(now, tonumber(redis.call("HGET", key, "t") or "0"))
    slot = math.floor(t / width)
    redis.call("HINCRBY", key, slot, units)
    if t == now then
      redis.call("HSET", key, "t", ARGV[1])
    end
    local ttl = math.ceil(((slot + 1) * width + window - now) * 1000)
    if redis.call("PTTL", key) < ttl then
      redis.call("PEXPIRE", key, math.max(1, ttl))
    end
  elseif resets > now then
    redis.call("INCRBY", key, units)
    redis.call("PEXPIRE", key, math.max(1, math.ceil((resets - now) * 1000)))
  end
  reply[#reply + 1] = slot
end
if ncredits > 0 then
  local now_us = math.floor(now * 1000000 + 0.5)
  local ref = string.match(KEYS[n + 1], ":recorded:(.*)$")
  for j = 1, ncredits do
    local spec = ARGV[3 + 5 * n + j]
    local units = tonumber(string.match(spec, "^(%S+)"))
    if units > 0 then
      local a = credit_open_for(KEYS[n + 1 + 2 * j - 1], KEYS[n + 1 + 2 * j], spec, now_us)
      credit_take_excess(a, units, now_us, ref)
      credit_save(a)
    end
  end
end
-- last: a script that failed half-way is not rolled back, but it can be retried
redis.call("SET", KEYS[n + 1], "1", "EX", ttl)
return reply
