-- Credit balances (plangate): the rules of plangate/engine/_credits.py, kept in Redis.
--
-- A balance is one hash: "debt", "plan_at" (the start of the last period whose plan grant
-- was issued), "seq" (the number of the newest ledger entry), "first" (of the oldest kept),
-- "base" (the sum of the entries trimmed from the ledger), "last" (the last reservation that
-- took from it and what it took), and a field "g:<id>" per grant: "remaining touched
-- effective expires amount priority category created source idempotency-key" (times in
-- microseconds; expires -1: never). A charge reads the first four and rewrites the first two:
-- the rest stays text unless the burn order or a refund needs it. Its ledger is a list beside
-- it (key .. ":ledger") of entries "seq kind amount grant time ref" (grant "-": none),
-- __LEDGER_CAP__ of them and up to __LEDGER_SLACK__ more: base + the entries' amounts is what
-- the grants hold less the debt. Amounts are whole sub-units, exact in a double up to 2^53.

local CATEGORY_RANK = {promotional = 0, paid = 1}

local function credit_fmt(x)
  return string.format("%d", x)
end

-- A grant as kept: what a charge changes first, then its tail as it was read (unless the
-- grant is new or its expiry moved: then the tail is written afresh).
local function credit_pack(g)
  local tail = g.tail
  if tail == nil then
    tail = table.concat({
      credit_fmt(g.effective), credit_fmt(g.expires), credit_fmt(g.amount),
      credit_fmt(g.priority), g.category, credit_fmt(g.created), g.source, g.idem,
    }, " ")
  end
  return credit_fmt(g.remaining) .. " " .. credit_fmt(g.touched) .. " " .. tail
end

-- A grant as a charge needs it: the fields it reads on every charge; credit_full adds the rest.
local function credit_unpack(id, text)
  local remaining, touched, tail, effective, expires =
    string.match(text, "^(%S+) (%S+) ((%S+) (%S+) .*)$")
  return {
    id = id, remaining = tonumber(remaining), touched = tonumber(touched),
    effective = tonumber(effective), expires = tonumber(expires), tail = tail,
  }
end

local function credit_full(g)
  if g.amount == nil then
    local amount, priority, category, created, source, idem =
      string.match(g.tail, "^%S+ %S+ (%S+) (%S+) (%S+) (%S+) (%S+) ?(.*)$")
    g.amount, g.priority, g.category = tonumber(amount), tonumber(priority), category
    g.created, g.source, g.idem = tonumber(created), source, idem
  end
  return g
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
local G, COLON = string.byte("g:", 1, 2)

-- The balance at key, as of now: expired grants written off (a ledger entry each).
local function credit_open(key, ledger, now)
  local a = {key = key, ledger = ledger, debt = 0, plan_at = -1, seq = 0, first = 1, base = 0,
    grants = {}, changed = {}}
  local flat = redis.call("HGETALL", key)
  local grants = a.grants
  for j = 1, #flat, 2 do
    local f = flat[j]
    local b1, b2 = string.byte(f, 1, 2)
    if b1 == G and b2 == COLON then
      local id = string.sub(f, 3)
      grants[id] = credit_unpack(id, flat[j + 1])
    elseif f == "seq" then
      a.seq = tonumber(flat[j + 1])
    elseif f == "last" then
      a.last = flat[j + 1]
    elseif f == "plan_at" then
      a.plan_at = tonumber(flat[j + 1])
    elseif f == "debt" then
      a.debt = tonumber(flat[j + 1])
    elseif f == "first" then
      a.first = tonumber(flat[j + 1])
    elseif f == "base" then
      a.base = tonumber(flat[j + 1])
    end
  end
  a.debt0, a.plan_at0, a.seq0 = a.debt, a.plan_at, a.seq
  local expired = nil
  for _, g in pairs(grants) do
    if g.remaining > 0 then
      if g.expires >= 0 and now >= g.expires then
        expired = expired or {}
        expired[#expired + 1] = g
      end
    else
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
  credit_full(g)
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
      a.gone = a.gone or {}
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
    for _, g in ipairs(order) do
      credit_full(g)
    end
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
    if g ~= nil then
      credit_full(g)
    end
    if g ~= nil and not (g.expires >= 0 and now >= g.expires) and g.remaining + n <= g.amount then
      local paid = math.min(a.debt, n)
      a.debt = a.debt - paid
      credit_set(a, g, g.remaining + n - paid, now)
      credit_log(a, "refund", n, now, g.id, ref)
    end
  end
end

local function credit_save(a)
  local gone = a.gone
  if a.seq == a.seq0 and a.debt == a.debt0 and a.plan_at == a.plan_at0 and next(a.changed) == nil
      and gone == nil and not a.last_changed then
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
  if gone ~= nil then
    redis.call("HDEL", a.key, unpack(gone))
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
