-- taskmesh once: claim one delivery of a task (KEYS[1]) for a holder (ARGV[1]) for ARGV[2] seconds
local current = redis.call('GET', KEYS[1])
if not current then
  redis.call('SET', KEYS[1], 'running:' .. ARGV[1], 'EX', ARGV[2])
  return 'claimed'
end
if current == 'done' then return 'done' end
if current == 'running:' .. ARGV[1] then
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  return 'mine'
end
return 'running'
