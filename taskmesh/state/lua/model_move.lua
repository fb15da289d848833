-- taskmesh warm models: move memory between two reservations of one pool, atomically
-- (KEYS: amounts, expiry; ARGV: from, to, amount, ttl, 'drop' to delete from entirely)
-- A model that loads takes its memory from the task that loaded it; a model evicted gives
-- its memory to the task that evicted it, after it was unloaded. The pool's total never
-- changes, so nothing is counted twice and nothing is offered to anyone else meanwhile.
local t = redis.call('TIME')
local deadline = tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[4])
local amount = tonumber(ARGV[3])
if ARGV[5] == 'drop' then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
elseif redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  local left = tonumber(redis.call('HGET', KEYS[1], ARGV[1])) - amount
  redis.call('HSET', KEYS[1], ARGV[1], math.max(left, 0))
end
if ARGV[2] ~= '' then
  redis.call('HINCRBY', KEYS[1], ARGV[2], amount)
  redis.call('ZADD', KEYS[2], deadline, ARGV[2])
end
return 1
