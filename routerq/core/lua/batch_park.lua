-- Set a line aside while the batch is paused; 0 means the batch is running again: run the line.
if redis.call('HGET', KEYS[1], 'status') ~= 'paused' then return 0 end
release(KEYS[1], KEYS[4], ARGV[1], KEYS[5])
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('SREM', KEYS[3], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return 1
