-- Put one orphan back at the head of its queue, unless someone (its owner's ack, another sweeper,
-- kombu's own restore) took it out of the unacked hash first.
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('RPUSH', KEYS[3], ARGV[2])
return 1
