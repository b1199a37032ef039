-- A credit balance, its grants and a page of its ledger, newest first (plangate). The
-- period's plan grant is issued first if it was not: reading counts as a use.
--
-- KEYS[1]  the balance's hash     KEYS[2]  its ledger
-- ARGV[1]  now, microseconds      ARGV[2]  "0 grant start finish" (finish 0: no plan grant)
-- ARGV[3]  entries a page         ARGV[4]  the page's cursor: the number of the entry the
--   last page ended at ("": the newest)
--
-- Returns {balance, debt, ledger sum ("" when limit is 0: no ledger read), grants (id,
-- packed)..., entries..., cursor}: grants
-- and entries are flat lists of their own; an entry is {id, kind, amount, grant, ref, time}.

local now = tonumber(ARGV[1])
local a = credit_open_for(KEYS[1], KEYS[2], ARGV[2], now)
credit_save(a)
local grants = {}
for id, g in pairs(a.grants) do
  grants[#grants + 1] = id
  grants[#grants + 1] = credit_pack(g)
end
local limit = tonumber(ARGV[3])
if limit == 0 then
  return {credit_balance(a, now), a.debt, "", grants, {}, ""}
end
-- the page: entries numbered below the cursor (all of them without one), newest first
local below = ARGV[4] == "" and a.seq + 1 or (tonumber(ARGV[4]) or 0)
local newest = math.min(below, a.seq + 1) - a.first - 1 -- its index in the list
local entries, cursor = {}, ""
if newest >= 0 then
  local oldest = math.max(0, newest - limit + 1)
  local found = redis.call("LRANGE", KEYS[2], oldest, newest)
  for j = #found, 1, -1 do
    local seq, kind, amount, grant, at, ref =
      string.match(found[j], "^(%S+) (%S+) (%S+) (%S+) (%S+) ?(.*)$")
    entries[#entries + 1] = {seq, kind, amount, grant == "-" and "" or grant, ref, at}
  end
  if oldest > 0 then
    cursor = entries[#entries][1]
  end
end
local sum = a.base
for _, text in ipairs(redis.call("LRANGE", KEYS[2], 0, -1)) do
  sum = sum + tonumber(string.match(text, "^%S+ %S+ (%S+)"))
end
return {credit_balance(a, now), a.debt, sum, grants, entries, cursor}
