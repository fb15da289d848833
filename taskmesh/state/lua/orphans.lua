-- taskmesh orphans: KEYS[1] hash tag -> when (Redis TIME) it was first seen held by no worker.
-- ARGV[1] = dead_after_s, ARGV[2..] = the tags no worker holds now. Tags not among them are
-- forgotten (acknowledged, or announced after all); returns those unheld for dead_after_s.
local now = tonumber(redis.call('TIME')[1])
local unheld = {}
for i = 2, #ARGV do unheld[ARGV[i]] = true end
local seen = redis.call('HGETALL', KEYS[1])
for i = 1, #seen, 2 do
  if not unheld[seen[i]] then redis.call('HDEL', KEYS[1], seen[i]) end
end
local due = {}
for i = 2, #ARGV do
  local first = redis.call('HGET', KEYS[1], ARGV[i])
  if not first then
    redis.call('HSET', KEYS[1], ARGV[i], now)
  elseif now - tonumber(first) >= tonumber(ARGV[1]) then
    table.insert(due, ARGV[i])
  end
end
return due
