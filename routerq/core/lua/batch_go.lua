-- May a line's call start now? Asked with a call slot held, right before the call: the batch may have
-- been cancelled or paused, or spent its budget, while the line waited for the slot. Returns the
-- message's delivery count (>= 1: go, the worker checks it against ROUTERQ_MAX_DELIVERIES), or a Go
-- verdict. Deliveries count here, at the call, so a crash blames the lines that were calling, not the
-- ones waiting behind them. With a budget, the line's estimated cost is reserved: the call may start
-- while spent + reserved + its estimate fits, or when no other call holds a reservation, so the spend
-- passes the budget by at most about one call. The estimate is the batch's mean cost per success;
-- before any line succeeded it is unknown, and calls go one at a time until one has.
-- The line joins the set of lines calling upstream (what `status` shows as running).
-- KEYS: meta, held, parked, run, deliveries, calling; ARGV: index, ttl, deliveries ttl
local meta, held, index = KEYS[1], KEYS[2], ARGV[1]
local f = redis.call('HMGET', meta, 'status', 'max_cost', 'cost', 'reserved', 'succeeded')
if not f[1] then return -1 end
if f[1] == 'cancelling' or f[1] == 'cancelled' or f[1] == 'failed' then return -2 end
if f[1] == 'paused' then
  release(meta, held, index, KEYS[6])
  redis.call('SADD', KEYS[3], index)
  redis.call('SREM', KEYS[4], index)
  redis.call('EXPIRE', KEYS[3], ARGV[2])
  return -3
end
local budget = tonumber(f[2] or '')
if budget then
  release(meta, held, index, KEYS[6])
  local spent, succeeded = tonumber(f[3] or '0'), tonumber(f[5] or '0')
  local reserved = tonumber(redis.call('HGET', meta, 'reserved') or '0')
  if spent >= budget then return -4 end
  local estimate = 0
  if succeeded > 0 then estimate = spent / succeeded end
  if redis.call('HLEN', held) > 0 and (succeeded == 0 or spent + reserved + estimate > budget) then
    return -4
  end
  redis.call('HSET', held, index, tostring(estimate))
  redis.call('HINCRBYFLOAT', meta, 'reserved', tostring(estimate))
  redis.call('EXPIRE', held, ARGV[2])
end
redis.call('SADD', KEYS[6], index)
redis.call('EXPIRE', KEYS[6], ARGV[2])
local n = redis.call('INCR', KEYS[5])
redis.call('EXPIRE', KEYS[5], ARGV[3])
return n
