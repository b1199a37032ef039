-- Sliding windows, shared by every script (plangate: prepended to each). A window is kept
-- one of two ways, as the counter says (Counter.exact):
--
-- An exact log (a limit of at most EXACT_WINDOW_LIMIT): a list. Element 0 is the header
-- "next_seq total n t evicted"; then n entries, newest first, each "seq time units". A unit
-- used at `time` counts while t < time + window. `seq` (the time in µs, made unique) is the
-- slot a settle names; `evicted` the newest seq that left the window. At most `bound` (the
-- limit, at least 1) entries: reservations at the same time share one; at the bound,
-- entries left with no units are dropped, and if that is not enough new units join the
-- newest entry, at the later time. A settle of a dropped entry goes to the next newer one.
-- So a unit never counts shorter than it should.
-- Buckets (a larger limit): a hash, bucket index -> units, and "t".
--
-- t is the latest time written: the time of a window never goes back.

local function log_entry(text)
  -- seq, time, units, and the time as written
  local seq, time, units = string.match(text, "(%S+) (%S+) (%S+)")
  return tonumber(seq), tonumber(time), tonumber(units), time
end

-- Entries from index `last` towards the newest, oldest first, until `visit` returns true;
-- answers how many were visited before that (all of them: last).
local function log_walk(key, last, visit)
  local seen, size = 0, 1 -- the oldest alone first: usually it is the only one needed
  while seen < last do
    local from = math.max(1, last - seen - size + 1)
    local chunk = redis.call("LRANGE", key, from, last - seen)
    for j = #chunk, 1, -1 do
      local seq, time, units = log_entry(chunk[j])
      if visit(time, units, seq) then
        return seen
      end
      seen = seen + 1
    end
    size = 32
  end
  return seen
end

-- The log at `key` as of `now` (text `now_text`), expired entries removed (or only not
-- counted, unless `write`); nil if the key holds buckets.
local function log_open(key, window, now, now_text, write)
  local head = redis.pcall("LINDEX", key, 0)
  if type(head) == "table" then
    return nil -- WRONGTYPE: buckets
  end
  -- a slot of an earlier life of this key is older: it has left the window
  local log = {key = key, window = window, seq = 0, total = 0, n = 0, t = now,
               t_text = now_text, evicted = math.floor(now * 1000000) - 1,
               exists = head ~= false, dirty = false}
  if head then
    local seq, total, n, t, evicted = string.match(head, "(%S+) (%S+) (%S+) (%S+) (%S+)")
    log.seq, log.total, log.n = tonumber(seq), tonumber(total), tonumber(n)
    log.evicted = tonumber(evicted)
    local seen = tonumber(t)
    log.newest = seen
    if seen > now then
      log.t, log.t_text = seen, t
    end
  end
  -- expired entries first, then up to the oldest that holds units (log.oldest)
  local freed, expired = 0, 0
  log_walk(key, log.n, function(time, units, seq)
    if time + window <= log.t then
      expired = expired + 1
      freed = freed + units
      log.evicted = seq
      return false
    end
    if units > 0 then
      log.oldest = time
      return true
    end
    return false
  end)
  if expired > 0 then
    log.n = log.n - expired
    log.total = log.total - freed
    if write then
      redis.call("LTRIM", key, 0, log.n)
      log.dirty = true
    end
  end
  return log
end

local function log_head(log)
  return string.format("%d %d %d %s %d", log.seq, log.total, log.n, log.t_text, log.evicted)
end

-- Drop the entries that hold no units (the log is at its bound).
local function log_compact(log)
  local all = redis.call("LRANGE", log.key, 1, -1)
  local kept = {}
  for _, text in ipairs(all) do
    local _, _, units = log_entry(text)
    if units > 0 then
      kept[#kept + 1] = text
    end
  end
  if #kept < #all then
    redis.call("LTRIM", log.key, 0, 0)
    for i = 1, #kept, 1000 do
      redis.call("RPUSH", log.key, unpack(kept, i, math.min(i + 999, #kept)))
    end
    log.n = #kept
    log.dirty = true
  end
end

local function log_expire(log, now)
  local ttl = math.ceil((log.t + log.window - now) * 1000)
  redis.call("PEXPIRE", log.key, math.max(1, ttl))
end

-- Write the header if expired entries were removed.
local function log_flush(log)
  if log.dirty then
    redis.call("LSET", log.key, 0, log_head(log))
    log.dirty = false
  end
end

-- Count `units` used at `time` (text `time_text`; never before the newest entry); answers
-- the entry's seq.
local function log_add(log, time, time_text, units, bound)
  log.total = log.total + units
  -- the newest entry is never later than the header's t: it can only be at `time` then
  if log.n > 0 and (log.newest == time or log.n >= bound) then
    local seq, newest, held = log_entry(redis.call("LINDEX", log.key, 1))
    if newest ~= time and log.n >= bound then
      log_compact(log)
      if log.n > 0 then
        seq, newest, held = log_entry(redis.call("LINDEX", log.key, 1))
      end
    end
    if log.n > 0 and (newest == time or log.n >= bound) then
      redis.call("LSET", log.key, 1, string.format("%d %s %d", seq, time_text, held + units))
      redis.call("LSET", log.key, 0, log_head(log))
      if held + units > 0 and (log.oldest == nil or log.oldest == newest) then
        log.oldest = time -- later, never earlier: no unit counts shorter than it should
      end
      log.newest = time
      log.dirty = false
      return seq
    end
  end
  log.newest = time
  local seq = math.max(log.seq, math.floor(time * 1000000))
  log.seq = seq + 1
  log.n = log.n + 1
  if log.oldest == nil and units > 0 then
    log.oldest = time
  end
  local entry = string.format("%d %s %d", seq, time_text, units)
  if log.exists then
    redis.call("LSET", log.key, 0, entry)
    redis.call("LPUSH", log.key, log_head(log))
  else
    redis.call("RPUSH", log.key, log_head(log), entry)
    log.exists = true
  end
  log.dirty = false
  return seq
end

-- Seconds until at least `excess` units have left the window.
local function log_wait(log, excess)
  local freed, wait = 0, log.window
  log_walk(log.key, log.n, function(time, units)
    freed = freed + units
    if freed >= excess then
      wait = time + log.window - log.t
      return true
    end
    return false
  end)
  return wait
end

-- Buckets kept as a log now (a plan changed the limit across EXACT_WINDOW_LIMIT): a bucket
-- becomes an entry at its end, or at t if that is sooner (its units were all used by then),
-- so no unit counts shorter than it did.
local function log_from_buckets(key, window, width, now, now_text, bound)
  local flat = redis.call("HGETALL", key)
  local t, t_text = now, now_text
  local buckets = {}
  for j = 1, #flat, 2 do
    if flat[j] == "t" then
      if tonumber(flat[j + 1]) > t then
        t, t_text = tonumber(flat[j + 1]), flat[j + 1]
      end
    else
      buckets[#buckets + 1] = {tonumber(flat[j]), tonumber(flat[j + 1])}
    end
  end
  table.sort(buckets, function(a, b) return a[1] < b[1] end)
  redis.call("DEL", key)
  local log = {key = key, window = window, seq = 0, total = 0, n = 0, t = t, t_text = t_text,
               evicted = -1, exists = false, dirty = false}
  for _, b in ipairs(buckets) do
    local ends = (b[1] + 1) * width
    if ends + window > t and b[2] > 0 then
      if ends >= t then
        log_add(log, t, t_text, b[2], bound)
      else
        log_add(log, ends, string.format("%.17g", ends), b[2], bound)
      end
    end
  end
  if log.exists then
    log_expire(log, now)
  end
  return log
end

-- A log kept as buckets now: each entry goes to the bucket of its time.
local function buckets_from_log(key, window, width, now, now_text)
  local all = redis.call("LRANGE", key, 0, -1)
  redis.call("DEL", key)
  if #all == 0 then
    return
  end
  local _, _, _, t_text = string.match(all[1], "(%S+) (%S+) (%S+) (%S+) (%S+)")
  local t = tonumber(t_text)
  if now > t then
    t, t_text = now, now_text
  end
  local newest = nil
  for j = #all, 2, -1 do
    local _, time, units = log_entry(all[j])
    if time + window > t and units > 0 then
      newest = math.floor(time / width)
      redis.call("HINCRBY", key, newest, units)
    end
  end
  if newest ~= nil then
    redis.call("HSET", key, "t", t_text)
    local ttl = math.ceil(((newest + 1) * width + window - now) * 1000)
    redis.call("PEXPIRE", key, math.max(1, ttl))
  end
end

-- Hourly usage aggregates: `units` more of `meter` in the hash `key` (one per customer and
-- hour), which expires `ttl` seconds from now when it is made.
local function usage_add(key, meter, units, ttl)
  if redis.call("HINCRBY", key, meter, units) == units then -- new (or back from 0)
    redis.call("EXPIRE", key, ttl)
  end
end
