-- Pause only a running batch (a cancel or an end wins), keeping the first reason.
if redis.call('HGET', KEYS[1], 'status') ~= 'in_progress' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'paused', 'reason', ARGV[1])
return 1
