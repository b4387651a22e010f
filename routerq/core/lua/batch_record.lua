-- Record one outcome atomically: counters, usage, running set and the final status move together.
-- Returns -1 (no batch), 0 (already recorded), 1, or 2 when this outcome ended the batch. What it
-- stores is counted in the running totals too (KEYS[7], routerq.core.counters).
local meta, out, run = KEYS[1], KEYS[2], KEYS[3]
local index, outcome, value = ARGV[1], ARGV[2], ARGV[3]
if redis.call('EXISTS', meta) == 0 then return -1 end
release(meta, KEYS[5], index, KEYS[6])
local names = {S = 'succeeded', F = 'failed', C = 'cancelled'}
local prev = redis.call('HGET', out, index)
if prev then
  local p = string.sub(prev, 1, 1)
  if p == 'S' or p == outcome then
    redis.call('SREM', run, index)
    return 0
  end
  redis.call('HINCRBY', meta, names[p], -1)
end
redis.call('HSET', out, index, outcome .. value)
redis.call('HINCRBY', meta, names[outcome], 1)
local via = redis.call('HGET', meta, 'via') or 'live'
redis.call('HINCRBY', KEYS[7], 'lines:' .. via .. ':' .. names[outcome], 1)
if ARGV[9] ~= '' then redis.call('HINCRBY', meta, ARGV[9], 1) end
if ARGV[10] ~= '0' then redis.call('HINCRBY', meta, 'retries', ARGV[10]) end
if ARGV[11] ~= '' then
  redis.call('HINCRBY', KEYS[4], 'lat:' .. ARGV[11], 1)
  redis.call('HINCRBY', KEYS[4], 'wait:' .. ARGV[12], 1)
  redis.call('EXPIRE', KEYS[4], ARGV[8])
end
if outcome == 'S' then
  redis.call('HINCRBY', meta, 'prompt_tokens', ARGV[4])
  redis.call('HINCRBY', meta, 'completion_tokens', ARGV[5])
  redis.call('HINCRBY', KEYS[7], 'prompt_tokens', ARGV[4])
  redis.call('HINCRBY', KEYS[7], 'completion_tokens', ARGV[5])
  redis.call('HINCRBYFLOAT', KEYS[7], 'cost', ARGV[6])
  local spent = tonumber(redis.call('HINCRBYFLOAT', meta, 'cost', ARGV[6]))
  local budget = tonumber(redis.call('HGET', meta, 'max_cost') or '')
  if budget and spent >= budget and redis.call('HGET', meta, 'status') == 'in_progress' then
    redis.call('HSET', meta, 'status', 'paused', 'reason', string.format('budget of $%s reached', budget))
  end
end
redis.call('SREM', run, index)
redis.call('EXPIRE', out, ARGV[8])
local f = redis.call('HMGET', meta, 'total', 'succeeded', 'failed', 'cancelled', 'status')
local done = tonumber(f[2] or 0) + tonumber(f[3] or 0) + tonumber(f[4] or 0)
if done >= tonumber(f[1]) then
  if f[5] == 'in_progress' or f[5] == 'paused' then
    redis.call('HSET', meta, 'status', 'completed', 'completed_at', ARGV[7])
    return 2
  elseif f[5] == 'cancelling' then
    redis.call('HSET', meta, 'status', 'cancelled', 'cancelled_at', ARGV[7])
    return 2
  end
end
return 1
