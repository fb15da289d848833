-- taskmesh unfetch: give back a message fetch.lua took for a channel that can no longer take it
-- (its prefetch shrank while the reply was on its way): off the unacked hash and index and back
-- on the end of its list that is popped next, as if never taken.
-- KEYS[1] = unacked hash, KEYS[2] = unacked_index, KEYS[3] = the list it came from.
-- ARGV[1] = its delivery tag, ARGV[2] = the message, ARGV[3] = 1 if fetch.lua recorded it.
if ARGV[3] == '1' and redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then
  return 0  -- already restored (by the orphan sweep or the visibility timeout): not twice
end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('RPUSH', KEYS[3], ARGV[2])
return 1
