-- Store an outcome atomically: a success is final (a redelivered job's later failure never
-- overwrites it), the job stops being pending, and whoever waits for it is woken at once.
local prev = redis.call('GET', KEYS[1])
if prev and ARGV[2] == '0' and cjson.decode(prev)['status'] == 'succeeded' then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
redis.call('ZREM', KEYS[2], ARGV[4])
redis.call('DEL', KEYS[3])
redis.call('LPUSH', KEYS[4], '1')
redis.call('EXPIRE', KEYS[4], ARGV[5])
return 1
