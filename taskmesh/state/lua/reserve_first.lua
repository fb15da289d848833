-- taskmesh ledger: reserve_first (sweep.lua is prepended)
local id, ttl = ARGV[1], tonumber(ARGV[2])
local options = cjson.decode(ARGV[3])
for o, option in ipairs(options) do  -- an id already held (unexpired) anywhere: a no-op, whatever the order
  for _, claim in ipairs(option) do
    local expiry = redis.call('ZSCORE', KEYS[2 * claim[1]], id)
    if expiry and tonumber(expiry) > now then return {o} end
  end
end
local used, refusals = {}, {}
for o, option in ipairs(options) do
  local fit = true
  for c, claim in ipairs(option) do
    local k = claim[1]
    if used[k] == nil then used[k] = sweep(KEYS[2*k-1], KEYS[2*k], now) end
    if used[k] + claim[3] > claim[2] then
      table.insert(refusals, o); table.insert(refusals, c); table.insert(refusals, used[k])
      fit = false
      break
    end
  end
  if fit then
    for _, claim in ipairs(option) do
      redis.call('HSET', KEYS[2*claim[1]-1], id, claim[3])
      redis.call('ZADD', KEYS[2*claim[1]], now + ttl, id)
    end
    return {o}
  end
end
local out = {0}
for _, v in ipairs(refusals) do table.insert(out, v) end
return out
