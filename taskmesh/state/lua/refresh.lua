-- taskmesh ledger: refresh
local t = redis.call('TIME')
local deadline = tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[1])
local refreshed = 0
for i = 1, #KEYS / 2 do
  for j = 2, #ARGV do
    if redis.call('HEXISTS', KEYS[2*i-1], ARGV[j]) == 1 then
      redis.call('ZADD', KEYS[2*i], 'XX', deadline, ARGV[j])
      refreshed = refreshed + 1
    end
  end
end
return refreshed
