-- taskmesh once: claim one delivery of a task (KEYS[1]) for a holder (ARGV[1]) for ARGV[2] seconds;
-- KEYS[2], when given, is the previous attempt's key: if its body returned, this is no new run
if KEYS[2] and redis.call('GET', KEYS[2]) == 'returned' then return 'done' end
local current = redis.call('GET', KEYS[1])
if not current then
  redis.call('SET', KEYS[1], 'running:' .. ARGV[1], 'EX', ARGV[2])
  return 'claimed'
end
if current == 'done' or current == 'returned' then return 'done' end
if current == 'running:' .. ARGV[1] then
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  return 'mine'
end
return 'running'
