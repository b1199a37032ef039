-- Delete a customer's record, leaving a tombstone: its last version, raised by one, and
-- deleted=1, kept for ARGV[2] seconds, so that a record made again never reuses a version
-- (plangate).
--
-- KEYS[1]     the customer's record
-- ARGV[1]     the version the delete expects ("": any)
-- ARGV[2]     seconds the tombstone is kept
--
-- Returns {1, the tombstone's version}, {0, current version} when it is not the expected
-- one (then nothing changes), or {2, 0} when there is no record to delete.

local stored = redis.call("HMGET", KEYS[1], "version", "deleted")
local last = tonumber(stored[1] or "0") or 0
local exists = redis.call("EXISTS", KEYS[1]) == 1 and stored[2] ~= "1"
local current = last
if not exists then
  current = 0
end
if ARGV[1] ~= "" and tonumber(ARGV[1]) ~= current then
  return {0, current}
end
if not exists then
  return {2, 0}
end
redis.call("DEL", KEYS[1])
redis.call("HSET", KEYS[1], "version", last + 1, "deleted", "1")
redis.call("EXPIRE", KEYS[1], tonumber(ARGV[2]))
return {1, last + 1}
