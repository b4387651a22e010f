-- The job goes on in a new message: a new generation, due `delay` ms from now, held by nobody, and a
-- note a waiting producer can show (why it waits; '' keeps the last one). Returns the new generation.
-- KEYS: result, chain; ARGV: new generation, delay (ms), note, the chain's ttl (s).
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[2], 'gen', ARGV[1], 'due', now + tonumber(ARGV[2]))
if ARGV[3] ~= '' then redis.call('HSET', KEYS[2], 'note', ARGV[3]) end
redis.call('HDEL', KEYS[2], 'holder', 'held_until')
redis.call('EXPIRE', KEYS[2], ARGV[4])
return ARGV[1]
