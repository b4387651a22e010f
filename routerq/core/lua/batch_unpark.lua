-- Leave a pause (to run again, or to cancel) before handing back the parked lines, so no new line is
-- parked meanwhile; ARGV[2]/ARGV[3] optionally stamp a field (cancelled_at).
if redis.call('HGET', KEYS[1], 'status') ~= 'paused' then return false end
redis.call('HSET', KEYS[1], 'status', ARGV[1])
if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], ARGV[2], ARGV[3]) end
redis.call('HDEL', KEYS[1], 'reason')
local parked = redis.call('SMEMBERS', KEYS[2])
redis.call('DEL', KEYS[2])
return parked
