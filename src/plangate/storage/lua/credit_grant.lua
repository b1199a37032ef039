-- Add a grant to a credit balance, once per idempotency key (plangate). See credits.lua.
--
-- KEYS[1]  the balance's hash     KEYS[2]  its ledger
-- KEYS[3]  the customer's idempotency keys: key → "<balance hash> <grant id> <fingerprint>"
-- ARGV[1]  now, microseconds
-- ARGV[2]  the grant's id         ARGV[3]  the grant, packed as credits.lua keeps it
-- ARGV[4]  its idempotency key ("": none)   ARGV[5]  the fingerprint of what was asked
-- ARGV[6]  "0 grant start finish": the period's plan grant, issued first if it was not
--
-- Returns {1, id, packed} for a new grant, {2, id, packed} for the one the key made before
-- ({2, id, ""} if that grant has since been forgotten), {0} for a key used for another body.

local now = tonumber(ARGV[1])
local idem = ARGV[4]
if idem ~= "" then
  local seen = redis.call("HGET", KEYS[3], idem)
  if seen then
    local where, id, fingerprint = string.match(seen, "^(%S+) (%S+) (.*)$")
    if where ~= KEYS[1] or fingerprint ~= ARGV[5] then
      return {0}
    end
    return {2, id, redis.call("HGET", KEYS[1], "g:" .. id) or ""}
  end
end
local a = credit_open_for(KEYS[1], KEYS[2], ARGV[6], now)
local g = credit_add(a, credit_unpack(ARGV[2], ARGV[3]), now)
credit_save(a)
if idem ~= "" then
  redis.call("HSET", KEYS[3], idem, KEYS[1] .. " " .. ARGV[2] .. " " .. ARGV[5])
end
return {1, ARGV[2], credit_pack(g)}
