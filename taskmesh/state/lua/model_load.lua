-- taskmesh warm models: a measured load (KEYS: learned load times, load counters;
-- ARGV: model, seconds, first guess or '', weight of the new sample)
-- The learned time is a moving average started from the declared guess, so one quick
-- load does not erase what the operator said; returns the new average.
local old = redis.call('HGET', KEYS[1], ARGV[1]) or (ARGV[3] ~= '' and ARGV[3]) or false
local sample, alpha = tonumber(ARGV[2]), tonumber(ARGV[4])
local value = sample
if old then value = alpha * sample + (1 - alpha) * tonumber(old) end
redis.call('HSET', KEYS[1], ARGV[1], tostring(value))
redis.call('HINCRBY', KEYS[2], ARGV[1] .. ':count', 1)
redis.call('HINCRBYFLOAT', KEYS[2], ARGV[1] .. ':seconds', sample)
return tostring(value)
