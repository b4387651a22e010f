-- Store an outcome atomically: a success is final (a redelivered job's later failure never
-- overwrites it), the job stops being pending, and whoever waits for it is woken at once.
-- A status it stores for the first time is counted in the running totals (KEYS[5]).
local prev = redis.call('GET', KEYS[1])
local before = prev and cjson.decode(prev)['status']
if ARGV[2] == '0' and before == 'succeeded' then return 0 end
local status = ARGV[2] == '1' and 'succeeded' or 'failed'
if before ~= status then
  redis.call('HINCRBY', KEYS[5], 'jobs:' .. status, 1)
  if status == 'succeeded' then
    redis.call('HINCRBY', KEYS[5], 'prompt_tokens', ARGV[6])
    redis.call('HINCRBY', KEYS[5], 'completion_tokens', ARGV[7])
    redis.call('HINCRBYFLOAT', KEYS[5], 'cost', ARGV[8])
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
redis.call('ZREM', KEYS[2], ARGV[4])
redis.call('DEL', KEYS[3])
redis.call('LPUSH', KEYS[4], '1')
redis.call('EXPIRE', KEYS[4], ARGV[5])
return 1
