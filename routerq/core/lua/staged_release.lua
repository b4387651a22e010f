-- Move staged messages (oldest first) onto the queue; mark the owner record in progress (ARGV[2] = 1)
-- and add its id to a watch set (KEYS[4], when given) in the same step.
local n = 0
while true do
  local v = redis.call('RPOPLPUSH', KEYS[1], KEYS[2])
  if not v then break end
  n = n + 1
end
if ARGV[2] == '1' then
  redis.call('HSET', KEYS[3], 'status', 'in_progress', 'in_progress_at', ARGV[1])
end
if KEYS[4] then redis.call('SADD', KEYS[4], ARGV[3]) end
return n
