-- taskmesh ledger: refresh (KEYS: amounts, expiry per pool; ARGV: ttl, JSON [[id, [[pool, amount], ...]], ...])
-- Pushes back the expiry of each reservation a worker still holds, and writes back any entry
-- the ledger lost (expired, a Redis restart, deleted keys) with its amount, whether or not the
-- pool still has room: the memory is in use. Returns the ids that had to be written back.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local deadline = now + tonumber(ARGV[1])
local recreated = {}
for _, held in ipairs(cjson.decode(ARGV[2])) do
  local id, missing = held[1], false
  for _, claim in ipairs(held[2]) do
    local amounts, expiry = KEYS[2 * claim[1] - 1], KEYS[2 * claim[1]]
    local score = redis.call('ZSCORE', expiry, id)
    if redis.call('HEXISTS', amounts, id) == 0 or not score or tonumber(score) <= now then
      redis.call('HSET', amounts, id, claim[2])
      missing = true
    end
    redis.call('ZADD', expiry, deadline, id)
  end
  if missing then table.insert(recreated, id) end
end
return recreated
