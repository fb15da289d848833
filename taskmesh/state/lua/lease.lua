-- taskmesh registry: renew a worker's lease (KEYS: leases, given-back hash; ARGV: worker key)
-- Returns how long since the last renewal by Redis's clock ('' when there was no lease) and
-- the messages (delivery tag, task id, flat) delivered again while it was presumed dead.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local seen = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], now, ARGV[1])
local age = ''
if seen then age = string.format('%.6f', now - tonumber(seen)) end
return {age, redis.call('HGETALL', KEYS[2])}
