-- Take away what a grant still holds (plangate). See credits.lua.
--
-- KEYS[1]  the balance's hash     KEYS[2]  its ledger
-- ARGV[1]  now, microseconds      ARGV[2]  the grant's id
-- ARGV[3]  "0 grant start finish": the period's plan grant, issued first if it was not
--
-- Returns the sub-units revoked, or -1 if there is no such grant.

local now = tonumber(ARGV[1])
local a = credit_open_for(KEYS[1], KEYS[2], ARGV[3], now)
local g = a.grants[ARGV[2]]
if g == nil then
  credit_save(a) -- what expired meanwhile; nothing for a customer with no balance
  return -1
end
local left = g.remaining
if left > 0 then
  credit_log(a, "revoke", -left, now, g.id, "")
end
-- revoked: it expires now, so a refund of an earlier charge does not come back to it
credit_set(a, g, 0, now)
if g.expires < 0 or g.expires > now then
  credit_full(g) -- its tail is written afresh
  g.expires, g.tail = now, nil
end
credit_save(a)
return left
