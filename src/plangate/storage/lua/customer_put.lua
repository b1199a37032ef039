-- Replace a customer's record and raise its version by one (plangate).
--
-- KEYS[1]     the customer's record (a hash; a deleted record leaves a tombstone: its last
--             version and deleted=1, so that versions never repeat)
-- ARGV[1]     the version the write expects ("": any; "0": no record yet)
-- ARGV[2..]   field, value, field, value, ... : every field of the record
--
-- Returns {1, new version}, or {0, current version} when it is not the expected one (then
-- nothing changes).

local stored = redis.call("HMGET", KEYS[1], "version", "deleted")
local last = tonumber(stored[1] or "0") or 0
local current = last
if stored[2] == "1" then
  current = 0
end
if ARGV[1] ~= "" and tonumber(ARGV[1]) ~= current then
  return {0, current}
end
redis.call("DEL", KEYS[1])
redis.call("HSET", KEYS[1], "version", last + 1, unpack(ARGV, 2))
return {1, last + 1}
