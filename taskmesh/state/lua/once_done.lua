-- taskmesh once: mark a run (KEYS[1]) done for ARGV[1] seconds; "returned" (its body returned) stays as it is
if redis.call('GET', KEYS[1]) ~= 'returned' then
  redis.call('SET', KEYS[1], 'done', 'EX', ARGV[1])
end
return 1
