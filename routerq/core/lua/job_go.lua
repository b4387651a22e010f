-- May a single job's call start now? Asked with a call slot held, right before the call. A job has one
-- live chain of messages: each re-publish names a new generation, and only a message of the current
-- generation may call. Copies (a message put back while its holder still lived, a re-send) end here.
-- Deliveries of the message count here, at the call (as batch lines' do): a crash blames the runs that
-- were calling, and a copy that ends or waits counts nothing.
-- KEYS: result, chain, the message's delivery counter; ARGV: this message's generation ('' for the
-- producer's), this run's owner id, how long the call may hold the job (ms), the chain's ttl (s), the
-- counter's ttl (s).
-- Returns {0, deliveries} (go: the job is held by this run), {-2, 0} (the job has its outcome: never
-- call again), {-5, 0} (a stale copy: a later message of the job exists), or {1, ms} (wait: the job's
-- countdown, or another run of the same message calling now).
if redis.call('EXISTS', KEYS[1]) == 1 then return {-2, 0} end
local f = redis.call('HMGET', KEYS[2], 'gen', 'due', 'holder', 'held_until')
if (f[1] or '') ~= ARGV[1] then return {-5, 0} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local wait = 0
-- a countdown is over half a second early: Celery's countdown and this clock may differ a little
if f[2] and tonumber(f[2]) - 500 > now then wait = tonumber(f[2]) - 500 - now end
if f[3] and f[3] ~= ARGV[2] and tonumber(f[4] or '0') > now then
  wait = math.max(wait, tonumber(f[4]) - now)
end
if wait > 0 then return {1, wait} end
redis.call('HSET', KEYS[2], 'holder', ARGV[2], 'held_until', now + tonumber(ARGV[3]))
redis.call('EXPIRE', KEYS[2], ARGV[4])
local n = redis.call('INCR', KEYS[3])
redis.call('EXPIRE', KEYS[3], ARGV[5])
return {0, n}
