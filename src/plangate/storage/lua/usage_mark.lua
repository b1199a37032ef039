-- Set fields of a customer's hourly usage aggregates (plangate.billing marks what it
-- exported), all at once; an hour no longer kept is not made again.
--
-- KEYS[i]  the aggregates of one hour (see usage_add)
-- ARGV[i]  its fields and values: "field value field value ..."

for i, key in ipairs(KEYS) do
  if redis.call("EXISTS", key) == 1 then
    local pairs_ = {}
    for word in string.gmatch(ARGV[i], "%S+") do
      pairs_[#pairs_ + 1] = word
    end
    if #pairs_ > 0 then
      redis.call("HSET", key, unpack(pairs_))
    end
  end
end
return 1
