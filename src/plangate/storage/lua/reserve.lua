-- Reserve the cost of one request on every counter of it, all or nothing (plangate).
--
-- KEYS[i]  counter i: a sliding window (a log or buckets, see window.lua), or a string for a
--   calendar period; then, per credit balance charged, its hash and its ledger (credits.lua;
--   its burn entries name this reservation, which is how a replay after a timeout knows it)
-- ARGV[1]  now, epoch seconds (the caller's clock; the time of a window never goes back)
-- ARGV[2]  "1": refuse when a limit would be exceeded; "0": count regardless (shadow mode);
--   with credits or usage, followed by " <number of balances> <reservation id>" ("0 -":
--   none), and with usage by " <seconds>": the last KEY is the hour's usage aggregates, a
--   hash (meter -> units), which expires that many seconds from now when it is made (0: no
--   usage); then " L" for a lease (see below)
-- ARGV[2 + i]  counter i, as "limit cost window resets bound [meter]": limit (-1:
--   unlimited), cost, window seconds (0: a period), period end (epoch seconds; 0 for a
--   window), for an exact log its bound on entries (0: buckets), and the meter whose usage
--   its cost adds to. One argument per counter: every argument costs the client time to
--   encode.
-- then per balance: "cost direct grant start finish" and, per overage, " index rate group":
--   the units of counter index (0-based) over its limit are charged at rate sub-units each,
--   the most over any limit of a group; a counter with overage never refuses by itself.
-- With " L" after those (a lease; no balances; storage/_leases.py), KEYS[n + 1] (n: the
-- number of counters) is the call's marker, and one more argument: "want fraction near"
--   then per counter " held slot". First the units this process held on the counter
--   and did not use go back (from the bucket or period they were counted in; an exact log is
--   never leased); then, if every counter admits, up to `want` more of the request's costs
--   are counted with it, at most `fraction` of what each limit has left after it and none
--   once a counter is at `near` of its limit. The units are counted in the bucket of now:
--   the caller uses them before that bucket ends, so they count at least as long as their
--   use would.
--
-- Returns one string (one reply element costs the client less to read than many):
--   "admitted retry_after_ms #violated violated indices (1-based)..." then per counter
--   " used reset_after_ms slot" (refused: slot is the ms this counter refuses), then per
--   balance ";short balance required charged" (short 1: it cannot cover it) and its burns,
--   " grant units" each.
-- "used" and "balance" are after the reservation when admitted, else before it.
-- A lease adds "|granted": how many more of the request's costs were counted for it.

local now_arg = ARGV[1]
local now = tonumber(now_arg)
local flag, ncredits, reservation, usage_ttl, mode =
  string.match(ARGV[2], "^(%d) ?(%d*) ?(%S*) ?(%d*) ?(%S*)$")
local enforce = flag == "1"
ncredits = tonumber(ncredits) or 0
usage_ttl = tonumber(usage_ttl) or 0
local leasing = mode == "L"
local ncounters = #KEYS - 2 * ncredits - (usage_ttl > 0 and 1 or 0) - (leasing and 1 or 0)
local nbuckets = __SLIDING_BUCKETS__

-- A lease's call is made once: the same call again (a client that lost the reply and sent it
-- again) answers what the first did and changes nothing.
local marker = leasing and KEYS[ncounters + 1] or nil
if marker ~= nil then
  local done = redis.call("GET", marker)
  if done then
    return done
  end
end
local function answer(text)
  if marker ~= nil then
    redis.call("SET", marker, text, "EX", __SETTLED_TTL__)
  end
  return text
end

local lease = leasing and ARGV[3 + ncounters + ncredits] or nil
local want, fraction, near, held_back = 0, 0, 0, {}
if lease ~= nil then
  local w, f, n, rest = string.match(lease, "^(%d+) (%S+) (%S+)(.*)$")
  want, fraction, near = tonumber(w), tonumber(f), tonumber(n)
  for held, slot in string.gmatch(rest, "(%d+) (%S+)") do
    held_back[#held_back + 1] = {tonumber(held), slot}
  end
end

local counters = {}
for i = 1, ncounters do
  local limit, cost, window, resets, bound, meter =
    string.match(ARGV[2 + i], "(%S+) (%S+) (%S+) (%S+) (%S+) ?(%S*)")
  local back = held_back[i]
  if back ~= nil and back[1] > 0 then
    -- what an earlier lease left unused: never more than its bucket or period still holds
    local held
    if tonumber(window) > 0 then
      if redis.call("TYPE", KEYS[i]).ok == "list" then
        -- a log (another process's plan): buckets again, as this counter reads it below
        buckets_from_log(KEYS[i], tonumber(window), tonumber(window) / nbuckets, now, now_arg)
      end
      held = redis.call("HGET", KEYS[i], back[2])
    else
      held = redis.call("GET", KEYS[i]) -- none: its period ended
    end
    if type(held) == "string" then
      local change = math.min(back[1], tonumber(held))
      if change > 0 and tonumber(window) > 0 then
        redis.call("HINCRBY", KEYS[i], back[2], -change)
      elseif change > 0 then
        redis.call("DECRBY", KEYS[i], change)
      end
    end
    if usage_ttl > 0 and meter ~= "" then -- the lease's units were counted as used
      usage_add(KEYS[#KEYS], meter, -back[1], usage_ttl)
    end
  end
  local c = {
    meter = meter,
    key = KEYS[i],
    limit = tonumber(limit),
    cost = tonumber(cost),
    window = tonumber(window),
    resets = tonumber(resets),
    bound = tonumber(bound),
    total = 0,
  }
  if c.window > 0 and c.bound > 0 then
    c.log = log_open(c.key, c.window, now, now_arg, true)
    if c.log == nil then -- buckets: a plan changed the limit
      c.log = log_from_buckets(c.key, c.window, c.window / nbuckets, now, now_arg, c.bound)
    end
    c.total = c.log.total
  elseif c.window > 0 then
    c.width = c.window / nbuckets
    c.t = now
    c.t_text = now_arg
    local flat = redis.pcall("HGETALL", c.key)
    if flat.err then -- a log: a plan changed the limit
      buckets_from_log(c.key, c.window, c.width, now, now_arg)
      flat = redis.call("HGETALL", c.key)
    end
    local buckets = {}
    for j = 1, #flat, 2 do
      if flat[j] == "t" then
        local seen = tonumber(flat[j + 1])
        if seen > c.t then
          c.t = seen
          c.t_text = flat[j + 1]
        end
      else
        buckets[#buckets + 1] = {tonumber(flat[j]), tonumber(flat[j + 1])}
      end
    end
    -- A bucket counts while any part of it lies inside (t - window, t].
    local horizon = c.t - c.window
    local live, stale = {}, {}
    for _, b in ipairs(buckets) do
      if (b[1] + 1) * c.width > horizon then
        live[#live + 1] = b
        c.total = c.total + b[2]
      else
        stale[#stale + 1] = tostring(b[1])
      end
    end
    if #stale > 0 then
      redis.call("HDEL", c.key, unpack(stale))
    end
    table.sort(live, function(a, b) return a[1] < b[1] end)
    c.live = live
  else
    local held = redis.call("GET", c.key)
    c.exists = held ~= false
    c.total = tonumber(held or "0")
  end
  counters[i] = c
end

local function expires_in(c, index)
  return (index + 1) * c.width + c.window - c.t
end

local function reset_after(c)
  if c.log then
    if c.log.oldest == nil then
      return 0
    end
    return c.log.oldest + c.window - c.log.t
  end
  if c.window > 0 then
    if #c.live == 0 then
      return 0
    end
    return expires_in(c, c.live[1][1])
  end
  return c.resets - now
end

local function wait_for(c)
  if c.window == 0 then
    return c.resets - now
  end
  if c.cost > c.limit then
    return c.window -- can never fit; say when the window is clear again
  end
  local excess = c.total + c.cost - c.limit
  if c.log then
    return log_wait(c.log, excess)
  end
  local freed = 0
  for _, b in ipairs(c.live) do
    freed = freed + b[2]
    if freed >= excess then
      return expires_in(c, b[1])
    end
  end
  return c.window
end

local credits = {}
for j = 1, ncredits do
  local spec = ARGV[2 + ncounters + j]
  local cost, direct, grant, start, finish, rest =
    string.match(spec, "^(%S+) (%S+) (%S+) (%S+) (%S+)(.*)$")
  local ch = {cost = tonumber(cost), direct = direct == "1", over = {}}
  for index, rate, group in string.gmatch(rest, "(%d+) (%d+) (%d+)") do
    ch.over[#ch.over + 1] = {tonumber(index) + 1, tonumber(rate), group}
    counters[tonumber(index) + 1].soft = true
  end
  ch.grant, ch.start, ch.finish = tonumber(grant), tonumber(start), tonumber(finish)
  credits[j] = ch
end

local violated = {}
local retry = 0
for i, c in ipairs(counters) do
  if c.limit >= 0 and c.total + c.cost > c.limit and not c.soft then
    violated[#violated + 1] = i
    c.wait = wait_for(c)
    retry = math.max(retry, c.wait)
  end
end

local function ms(seconds)
  return math.max(0, math.ceil(seconds * 1000))
end

-- Each balance, as of now (its period's plan grant issued), and what it must cover.
local short = 0
if ncredits > 0 then
  local now_us = math.floor(now * 1000000 + 0.5)
  for j, ch in ipairs(credits) do
    local a = credit_open(KEYS[ncounters + 2 * j - 1], KEYS[ncounters + 2 * j], now_us)
    if ch.finish > 0 then
      credit_issue_plan(a, ch.grant, ch.start, ch.finish, now_us)
    end
    credit_prune(a, now_us)
    local need, over = ch.cost, {}
    for _, o in ipairs(ch.over) do
      local c = counters[o[1]]
      if c.limit >= 0 then
        local units = math.min(c.cost, c.total + c.cost - c.limit)
        if units > 0 and (over[o[3]] == nil or units > over[o[3]][1]) then
          over[o[3]] = {units, o[2]}
        end
      end
    end
    for _, g in pairs(over) do
      need = need + g[1] * g[2]
    end
    ch.account, ch.need, ch.now = a, need, now_us
    ch.balance = credit_balance(a, now_us)
    local last = a.last
    if last ~= nil and reservation ~= "-" and string.sub(last, 1, #reservation + 1) == reservation .. " " then
      -- this reservation was made before (a client sent it again after losing the reply):
      -- what it took stands, and nothing is taken twice
      ch.made = string.sub(last, #reservation + 2)
      ch.short = false
    else
      ch.short = (ch.direct or need > 0) and need > ch.balance
    end
    if ch.short then
      short = short + 1
    end
  end
end

-- The balances' part of the reply; taken: whether the reservation took what they needed.
local function credits_reply(taken)
  local text = ""
  for _, ch in ipairs(credits) do
    local burns, charged, balance = {}, 0, ch.balance
    if ch.made ~= nil then
      for id, units in string.gmatch(ch.made, "(%S+) (%d+)") do
        burns[#burns + 1] = id
        burns[#burns + 1] = tonumber(units)
        charged = charged + tonumber(units)
      end
    elseif taken and ch.need > 0 then
      burns, charged = credit_burn(ch.account, ch.need, ch.now, reservation)
      balance = ch.balance - charged
      local made = {reservation}
      for k = 1, #burns, 2 do
        made[#made + 1] = burns[k] .. " " .. credit_fmt(burns[k + 1])
      end
      ch.account.last, ch.account.last_changed = table.concat(made, " "), true
    end
    credit_save(ch.account)
    local parts = {ch.short and ";1" or ";0", credit_fmt(balance), credit_fmt(ch.need),
      credit_fmt(charged)}
    for k = 1, #burns, 2 do
      parts[#parts + 1] = burns[k]
      parts[#parts + 1] = credit_fmt(burns[k + 1])
    end
    text = text .. table.concat(parts, " ")
  end
  return text
end

local reply = {}
if (#violated > 0 or short > 0) and enforce then
  reply = {string.format("0 %d %d", ms(retry), #violated)}
  for _, i in ipairs(violated) do
    reply[#reply + 1] = i
  end
  for _, c in ipairs(counters) do
    if c.log then
      log_flush(c.log) -- expired entries were removed
    end
    -- refused: no slot, but how long this counter refuses
    reply[#reply + 1] = string.format("%d %d %d", c.total, ms(reset_after(c)), ms(c.wait or 0))
  end
  return answer(table.concat(reply, " ") .. credits_reply(false))
end

-- A lease: as many more of the request's costs as every counter has room for.
local granted = 0
if want > 0 and #violated == 0 and enforce then
  granted = want
  for _, c in ipairs(counters) do
    if c.limit >= 0 and c.cost > 0 then
      local after = c.total + c.cost
      local room = 0
      if after < near * c.limit then
        room = math.floor(fraction * (c.limit - after) / c.cost)
      end
      granted = math.min(granted, room)
    end
  end
  for _, c in ipairs(counters) do
    c.cost = c.cost * (1 + granted)
  end
end

local used = false
reply = {string.format("%d 0 %d", (#violated == 0 and short == 0) and 1 or 0, #violated)}
for _, i in ipairs(violated) do
  reply[#reply + 1] = i
end
for _, c in ipairs(counters) do
  local slot = 0
  if c.log then
    slot = log_add(c.log, c.log.t, c.log.t_text, c.cost, c.bound)
    log_expire(c.log, now)
  elseif c.window > 0 then
    slot = math.floor(c.t / c.width)
    -- t never goes back, so this bucket is the newest one
    local last = c.live[#c.live]
    if last ~= nil and last[1] == slot then
      last[2] = last[2] + c.cost
      redis.call("HSET", c.key, slot, last[2], "t", c.t_text)
    else
      c.live[#c.live + 1] = {slot, c.cost}
      redis.call("HSET", c.key, slot, c.cost, "t", c.t_text)
      -- the key lives until its newest bucket leaves the window: set when that bucket starts
      redis.call("PEXPIRE", c.key, math.max(1, ms(expires_in(c, slot))))
    end
  else
    redis.call("INCRBY", c.key, c.cost)
    if not c.exists then
      -- relative to the caller's clock, like every time in these scripts
      redis.call("PEXPIRE", c.key, math.max(1, ms(c.resets - now)))
    end
  end
  c.total = c.total + c.cost
  reply[#reply + 1] = string.format("%d %d %d", c.total, ms(reset_after(c)), slot)
  if usage_ttl > 0 and c.meter ~= "" and c.cost ~= 0 then
    usage_add(KEYS[#KEYS], c.meter, c.cost, usage_ttl)
    used = true
  end
end
if used and ncredits == 0 and reservation ~= "-" then
  -- the last reservation made: a client whose reply was lost replays its usage, and the
  -- replay finds it made here (a reservation with credits is found in its ledger)
  redis.call("HSET", KEYS[#KEYS], "#last", reservation)
end
if lease ~= nil then
  return answer(table.concat(reply, " ") .. "|" .. granted)
end
return table.concat(reply, " ") .. credits_reply(enforce)
