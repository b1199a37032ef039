-- Credit balances (plangate): the rules of plangate/engine/_credits.py, kept in Redis.
--
-- A balance is one hash: "debt", "plan_at" (the start of the last period whose plan grant
-- was issued), "seq" (the number of the newest ledger entry), "first" (of the oldest kept),
-- "base" (the sum of the entries trimmed from the ledger), "last" (the last reservation that
-- took from it and what it took), and a field "g:<id>" per grant: "amount remaining priority
-- category effective expires created touched source idempotency-key" (times in
-- microseconds; expires -1: never). Its ledger is a list beside it (key .. ":ledger") of
-- entries "seq kind amount grant time ref" (grant "-": none), __LEDGER_CAP__ of them and up to
-- __LEDGER_SLACK__ more: base + the entries' amounts is what the grants hold less the debt.
-- Amounts are whole sub-units, exact in a double up to 2^53.

local CATEGORY_RANK = {promotional = 0, paid = 1}

local function credit_fmt(x)
  return string.format("%d", x)
end

local function credit_pack(g)
  return table.concat({
    credit_fmt(g.amount), credit_fmt(g.remaining), credit_fmt(g.priority), g.category,
    credit_fmt(g.effective), credit_fmt(g.expires), credit_fmt(g.created),
    credit_fmt(g.touched), g.source, g.idem,
  }, " ")
end

local function credit_unpack(id, text)
  local amount, remaining, priority, category, effective, expires, created, touched, source, idem =
    string.match(text, "^(%S+) (%S+) (%S+) (%S+) (%S+) (%S+) (%S+) (%S+) (%S+) ?(.*)$")
  return {
    id = id, amount = tonumber(amount), remaining = tonumber(remaining),
    priority = tonumber(priority), category = category, effective = tonumber(effective),
    expires = tonumber(expires), created = tonumber(created), touched = tonumber(touched),
    source = source, idem = idem,
  }
end

local function credit_usable(g, now)
  return g.remaining > 0 and g.effective <= now and (g.expires < 0 or now < g.expires)
end

-- Past __LEDGER_CAP__ + __LEDGER_SLACK__ entries, the oldest are summed into base and trimmed in
-- one go (trimming one entry per charge cost more than the rest of a charge).
local function credit_log(a, kind, amount, now, grant, ref)
  a.seq = a.seq + 1
  redis.call("RPUSH", a.ledger, credit_fmt(a.seq) .. " " .. kind .. " " .. credit_fmt(amount)
    .. " " .. (grant or "-") .. " " .. credit_fmt(now) .. " " .. (ref or ""))
  local kept = a.seq - a.first + 1
  if kept > __LEDGER_CAP__ + __LEDGER_SLACK__ then
    local drop = kept - __LEDGER_CAP__
    for _, text in ipairs(redis.call("LRANGE", a.ledger, 0, drop - 1)) do
      a.base = a.base + tonumber(string.match(text, "^%S+ %S+ (%S+)"))
    end
    redis.call("LTRIM", a.ledger, drop, -1)
    a.first = a.first + drop
    a.trimmed = true
  end
end

local function credit_set(a, g, remaining, now)
  g.remaining = remaining
  g.touched = now
  a.changed[g.id] = g
end

-- The balance at key, as of now: expired grants written off (a ledger entry each).
local function credit_open(key, ledger, now)
  local a = {key = key, ledger = ledger, debt = 0, plan_at = -1, seq = 0, first = 1, base = 0,
    grants = {}, changed = {}, gone = {}}
  local flat = redis.call("HGETALL", key)
  for j = 1, #flat, 2 do
    local f, v = flat[j], flat[j + 1]
    if string.sub(f, 1, 2) == "g:" then
      local g = credit_unpack(string.sub(f, 3), v)
      a.grants[g.id] = g
    elseif f == "debt" then
      a.debt = tonumber(v)
    elseif f == "plan_at" then
      a.plan_at = tonumber(v)
    elseif f == "seq" then
      a.seq = tonumber(v)
    elseif f == "first" then
      a.first = tonumber(v)
    elseif f == "base" then
      a.base = tonumber(v)
    elseif f == "last" then
      a.last = v
    end
  end
  a.debt0, a.plan_at0, a.seq0 = a.debt, a.plan_at, a.seq
  local expired = nil
  for _, g in pairs(a.grants) do
    if g.expires >= 0 and now >= g.expires and g.remaining > 0 then
      expired = expired or {}
      expired[#expired + 1] = g
    elseif g.remaining == 0 then
      a.empty = true -- one to forget, perhaps (credit_prune)
    end
  end
  if expired ~= nil then
    table.sort(expired, function(x, y) return x.id < y.id end)
    for _, g in ipairs(expired) do
      credit_log(a, "expiry", -g.remaining, now, g.id, "")
      credit_set(a, g, 0, now)
    end
    a.empty = true
  end
  return a
end

local function credit_balance(a, now)
  local total = 0
  for _, g in pairs(a.grants) do
    if credit_usable(g, now) then
      total = total + g.remaining
    end
  end
  return total - a.debt
end

local function credit_before(x, y)
  if x.priority ~= y.priority then
    return x.priority < y.priority
  end
  local xe = x.expires < 0 and math.huge or x.expires
  local ye = y.expires < 0 and math.huge or y.expires
  if xe ~= ye then
    return xe < ye
  end
  local xc, yc = CATEGORY_RANK[x.category] or 1, CATEGORY_RANK[y.category] or 1
  if xc ~= yc then
    return xc < yc
  end
  if x.created ~= y.created then
    return x.created < y.created
  end
  return x.id < y.id
end

-- Add a grant; the debt is paid from it first.
local function credit_add(a, g, now)
  credit_log(a, "grant", g.amount, now, g.id, g.idem)
  local paid = 0
  if credit_usable(g, now) then
    paid = math.min(a.debt, g.remaining)
  end
  a.debt = a.debt - paid
  a.grants[g.id] = g
  credit_set(a, g, g.remaining - paid, now)
  return g
end

-- The plan's grant for [start, finish), once per period.
local function credit_issue_plan(a, amount, start, finish, now)
  if a.plan_at >= start then
    return
  end
  a.plan_at = start
  if amount > 0 then
    credit_add(a, {
      id = "plan-" .. credit_fmt(math.floor(start / 1000000)), amount = amount,
      remaining = amount, priority = 100, category = "paid", effective = start,
      expires = finish, created = start, touched = now, source = "plan", idem = "",
    }, now)
  end
end

-- Forget grants that hold nothing and have not changed for a day.
local function credit_prune(a, now)
  if not a.empty then
    return
  end
  for id, g in pairs(a.grants) do
    if g.remaining == 0 and g.touched + __PRUNE_AFTER__ <= now then
      a.grants[id] = nil
      a.changed[id] = nil
      a.gone[#a.gone + 1] = "g:" .. id
    end
  end
end

-- Take units in burn order (the caller checked the balance covers what it must); the
-- burns, flat: id, units, id, units...
local function credit_burn(a, units, now, ref)
  local order = {}
  for _, g in pairs(a.grants) do
    if credit_usable(g, now) then
      order[#order + 1] = g
    end
  end
  if #order > 1 then
    table.sort(order, credit_before)
  end
  local burns, left = {}, units
  for _, g in ipairs(order) do
    if left <= 0 then
      break
    end
    local n = math.min(left, g.remaining)
    credit_set(a, g, g.remaining - n, now)
    credit_log(a, "burn", -n, now, g.id, ref)
    burns[#burns + 1] = g.id
    burns[#burns + 1] = n
    left = left - n
  end
  return burns, units - left
end

-- Take units already used: what the grants cannot cover becomes debt.
local function credit_take_excess(a, units, now, ref)
  local burns, taken = credit_burn(a, units, now, ref)
  local short = units - taken
  if short > 0 then
    -- debt stays a whole number a double holds exactly (what is past it is not owed twice)
    short = math.min(short, __MAX_UNITS__ - a.debt)
    a.debt = a.debt + short
    credit_log(a, "excess", -short, now, nil, ref)
  end
  return burns
end

-- Give back up to units of what burns (flat: id, units...) took, the last taken first,
-- each to its grant unless that grant expired, went, or would hold more than it was given.
local function credit_refund(a, burns, units, now, ref)
  local left = units
  for j = #burns - 1, 1, -2 do
    if left <= 0 then
      break
    end
    local n = math.min(left, burns[j + 1])
    left = left - n
    local g = a.grants[burns[j]]
    if g ~= nil and not (g.expires >= 0 and now >= g.expires) and g.remaining + n <= g.amount then
      local paid = math.min(a.debt, n)
      a.debt = a.debt - paid
      credit_set(a, g, g.remaining + n - paid, now)
      credit_log(a, "refund", n, now, g.id, ref)
    end
  end
end

local function credit_save(a)
  if a.seq == a.seq0 and a.debt == a.debt0 and a.plan_at == a.plan_at0 and next(a.changed) == nil
      and #a.gone == 0 and not a.last_changed then
    return -- nothing changed: nothing written (a read of a customer with no balance leaves none)
  end
  local fields = {"seq", credit_fmt(a.seq)}
  if a.debt ~= a.debt0 then
    fields[#fields + 1] = "debt"
    fields[#fields + 1] = credit_fmt(a.debt)
  end
  if a.plan_at ~= a.plan_at0 then
    fields[#fields + 1] = "plan_at"
    fields[#fields + 1] = credit_fmt(a.plan_at)
  end
  if a.trimmed then
    fields[#fields + 1] = "base"
    fields[#fields + 1] = credit_fmt(a.base)
    fields[#fields + 1] = "first"
    fields[#fields + 1] = credit_fmt(a.first)
  end
  if a.last_changed then
    fields[#fields + 1] = "last"
    fields[#fields + 1] = a.last
  end
  for id, g in pairs(a.changed) do
    fields[#fields + 1] = "g:" .. id
    fields[#fields + 1] = credit_pack(g)
  end
  redis.call("HSET", a.key, unpack(fields))
  if #a.gone > 0 then
    redis.call("HDEL", a.key, unpack(a.gone))
  end
end

-- "delta grant start finish" and, for a settle, the burns "id units id units...": the
-- account of a settle or record, opened with its period's plan grant issued.
local function credit_open_for(key, ledger, spec, now)
  local a = credit_open(key, ledger, now)
  local grant, start, finish = string.match(spec, "^%S+ (%S+) (%S+) (%S+)")
  if tonumber(finish) > 0 then
    credit_issue_plan(a, tonumber(grant), tonumber(start), tonumber(finish), now)
  end
  credit_prune(a, now)
  return a
end

-- What reservation ref burned from the balance whose ledger is given, read back from its
-- newest entries (flat: id, units...); nil if it burned nothing there. For the rare paths
-- after an outage: a reservation whose reply timed out may have been made all the same.
local function credit_burned(ledger, ref)
  local found = nil
  for _, text in ipairs(redis.call("LRANGE", ledger, 0, -1)) do
    local kind, amount, grant, entry_ref = string.match(text, "^%S+ (%S+) (%S+) (%S+) %S+ (.*)$")
    if kind == "burn" and entry_ref == ref then
      found = found or {}
      found[#found + 1] = grant
      found[#found + 1] = -tonumber(amount)
    end
  end
  return found
end
