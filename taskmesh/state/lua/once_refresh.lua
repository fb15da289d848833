-- taskmesh once: push back the expiry of the claims (KEYS) this holder (ARGV[1]) still has, by ARGV[2] s
local refreshed = 0
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == 'running:' .. ARGV[1] then
    redis.call('EXPIRE', key, ARGV[2])
    refreshed = refreshed + 1
  end
end
return refreshed
