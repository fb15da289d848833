-- taskmesh lock release: delete the lock only if this holder's token still owns it
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
