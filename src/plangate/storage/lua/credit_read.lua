-- A credit balance, its grants and a page of its ledger, newest first (plangate). The
-- period's plan grant is issued first if it was not: reading counts as a use.
--
-- KEYS[1]  the balance's hash     KEYS[2]  its ledger
-- ARGV[1]  now, microseconds      ARGV[2]  "0 grant start finish" (finish 0: no plan grant)
-- ARGV[3]  entries a page         ARGV[4]  the page's cursor: the id the last page ended at
--   ("": the newest)
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
local top = ARGV[4] == "" and "+" or "(" .. ARGV[4]
local found = {}
if ARGV[4] ~= "0-0" and ARGV[4] ~= "0" then -- nothing is older than the first id
  found = redis.call("XREVRANGE", KEYS[2], top, "-", "COUNT", limit + 1)
end
local entries = {}
for j = 1, math.min(limit, #found) do
  local e = {found[j][1]}
  local fields = found[j][2]
  local by = {}
  for k = 1, #fields, 2 do
    by[fields[k]] = fields[k + 1]
  end
  e[2], e[3], e[4], e[5], e[6] = by.k, by.a, by.g, by.r, by.t
  entries[#entries + 1] = e
end
local cursor = ""
if #found > limit then
  cursor = found[limit][1]
end
local sum = a.base
for _, entry in ipairs(redis.call("XRANGE", KEYS[2], "-", "+")) do
  local fields = entry[2]
  for k = 1, #fields, 2 do
    if fields[k] == "a" then
      sum = sum + tonumber(fields[k + 1])
    end
  end
end
return {credit_balance(a, now), a.debt, sum, grants, entries, cursor}
