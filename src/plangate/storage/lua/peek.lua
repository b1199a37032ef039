-- Read counters without consuming anything (plangate): the entitlements endpoint, explain.
--
-- KEYS[i]  counter i
-- ARGV[1]  now, epoch seconds; ARGV[2] buckets per sliding window
-- then per counter, 2 values: window seconds (0: a period), period end (epoch seconds)
--
-- Returns per counter: used, reset_after_ms. A window is read as it is kept, a log or
-- buckets (see window.lua).

local now = tonumber(ARGV[1])
local nbuckets = tonumber(ARGV[2])
local reply = {}
for i = 1, #KEYS do
  local window = tonumber(ARGV[2 + (i - 1) * 2 + 1])
  local resets = tonumber(ARGV[2 + (i - 1) * 2 + 2])
  local used, reset = 0, 0
  local log = nil
  if window > 0 then
    log = log_open(KEYS[i], window, now, ARGV[1], false)
  end
  if log ~= nil then
    used = log.total
    if log.oldest ~= nil then
      reset = log.oldest + window - log.t
    end
  elseif window > 0 then
    local width = window / nbuckets
    local flat = redis.call("HGETALL", KEYS[i])
    local t = now
    for j = 1, #flat, 2 do
      if flat[j] == "t" then
        t = math.max(t, tonumber(flat[j + 1]))
      end
    end
    local oldest = nil
    for j = 1, #flat, 2 do
      if flat[j] ~= "t" then
        local index = tonumber(flat[j])
        if (index + 1) * width > t - window then
          used = used + tonumber(flat[j + 1])
          if oldest == nil or index < oldest then
            oldest = index
          end
        end
      end
    end
    if oldest ~= nil then
      reset = (oldest + 1) * width + window - t
    end
  else
    used = tonumber(redis.call("GET", KEYS[i]) or "0")
    reset = resets - now
  end
  reply[#reply + 1] = used
  reply[#reply + 1] = math.max(0, math.ceil(reset * 1000))
end
return reply
