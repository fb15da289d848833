-- taskmesh registry: presume a worker dead (KEYS: leases, its in-flight set; ARGV: worker key, dead_after_s)
-- Only if its lease has not been renewed for dead_after_s by Redis's clock: checked and acted on
-- in one step, so a worker that renews meanwhile keeps its messages. Returns the tags to give back.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local seen = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not seen or now - tonumber(seen) <= tonumber(ARGV[2]) then return {} end
local tags = redis.call('SMEMBERS', KEYS[2])
redis.call('DEL', KEYS[2])
return tags
