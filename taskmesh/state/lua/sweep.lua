-- taskmesh ledger: sweep
local function sweep(amounts, expiry, now)
  local dead = redis.call('ZRANGEBYSCORE', expiry, '-inf', now)
  for _, id in ipairs(dead) do redis.call('HDEL', amounts, id) end
  if #dead > 0 then redis.call('ZREMRANGEBYSCORE', expiry, '-inf', now) end
  local used = 0
  for _, v in ipairs(redis.call('HVALS', amounts)) do used = used + tonumber(v) end
  return used
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
