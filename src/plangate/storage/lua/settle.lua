-- Commit, adjust or refund a reservation: add actual - reserved to each counter, where the
-- reservation put it; once per reservation id (plangate).
--
-- KEYS[1..n]  the counters of the reservation
-- KEYS[n+1]   the reservation's settled marker
-- ARGV[1]     now, epoch seconds
-- ARGV[2]     how long the marker is kept, seconds
-- then per counter, 4 values: window seconds (0: a period), period end (epoch seconds),
--   slot (the sliding-window bucket), delta (may be negative)
--
-- Returns 1, or 0 if this reservation was settled before (then nothing changes).

local n = #KEYS - 1
local now = tonumber(ARGV[1])
if redis.call("EXISTS", KEYS[n + 1]) == 1 then
  return 0
end
for i = 1, n do
  local base = 2 + (i - 1) * 4
  local key = KEYS[i]
  local window = tonumber(ARGV[base + 1])
  local resets = tonumber(ARGV[base + 2])
  local slot = ARGV[base + 3]
  local delta = tonumber(ARGV[base + 4])
  if delta ~= 0 then
    if window > 0 then
      -- A bucket already out of the window (or an expired counter) stays out; a refund never
      -- takes more than the bucket holds.
      local held = tonumber(redis.call("HGET", key, slot))
      if held ~= nil then
        redis.call("HINCRBY", key, slot, math.max(delta, -held))
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
-- last: a script that failed half-way is not rolled back, but it can be retried
redis.call("SET", KEYS[n + 1], "1", "EX", ARGV[2])
return 1
