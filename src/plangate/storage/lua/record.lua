-- Add usage that was admitted elsewhere (replayed after a storage outage), once per id
-- (plangate). No limit is checked: the usage happened.
--
-- KEYS[1..n]  counters (sliding windows, see window.lua, or calendar-period strings)
-- KEYS[n+1]   the replay's marker: present means this usage was recorded before
-- ARGV[1]     now, epoch seconds: when the usage happened
-- ARGV[2]     how long the marker is kept, seconds
-- ARGV[3]     buckets per sliding window
-- then per counter, 4 values: window seconds (0: a period), period end (epoch seconds),
--   units, and the log's bound (0: buckets)
--
-- Returns {1, slot per counter...}, or {0} if this usage was recorded before.

local n = #KEYS - 1
local now = tonumber(ARGV[1])
if redis.call("EXISTS", KEYS[n + 1]) == 1 then
  return {0}
end
local nbuckets = tonumber(ARGV[3])
local reply = {1}
for i = 1, n do
  local base = 3 + (i - 1) * 4
  local key = KEYS[i]
  local window = tonumber(ARGV[base + 1])
  local resets = tonumber(ARGV[base + 2])
  local units = tonumber(ARGV[base + 3])
  local bound = tonumber(ARGV[base + 4])
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
-- last: a script that failed half-way is not rolled back, but it can be retried
redis.call("SET", KEYS[n + 1], "1", "EX", ARGV[2])
return reply
