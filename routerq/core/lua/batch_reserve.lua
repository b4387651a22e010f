-- May an upstream batch (a chunk of `n` lines, routerq.core.upstream_batch) be submitted now, and how
-- many of its lines? The budget's answer to batch_go.lua's question, for lines that go in one request.
-- Returns how many lines to submit (1..n), or a Go verdict: -2 stopped, -3 paused (set aside the
-- lines), -4 wait (other calls or upstream batches hold the rest of the budget).
-- Without a budget: all n. With one: as many as spent + reserved + their estimate fits, at least one
-- when nothing else holds a reservation (the spend passes the budget by at most about one line, as
-- for live lines); an unknown estimate (no price, no answer yet) sends one line alone, to learn it.
-- A chunk reserves once: asked again (its message redelivered), the first answer stands.
-- KEYS: meta, held, chunk; ARGV: field (the chunk's name in held), estimate per line or '', n, ttl
local meta, held, chunk, field = KEYS[1], KEYS[2], KEYS[3], ARGV[1]
local f = redis.call('HMGET', meta, 'status', 'max_cost', 'cost')
if not f[1] then return -1 end
if f[1] == 'cancelling' or f[1] == 'cancelled' or f[1] == 'failed' then return -2 end
if f[1] == 'paused' then return -3 end
local n = tonumber(ARGV[3])
local budget = tonumber(f[2] or '')
if not budget then return n end
local earlier = redis.call('HGET', chunk, 'reserved_lines')
if earlier and redis.call('HEXISTS', held, field) == 1 then return tonumber(earlier) end
local spent = tonumber(f[3] or '0')
if spent >= budget then
  redis.call('HSET', meta, 'status', 'paused', 'reason', string.format('budget of $%s reached', budget))
  return -3
end
local reserved = tonumber(redis.call('HGET', meta, 'reserved') or '0')
local others = redis.call('HLEN', held) > 0
local estimate = tonumber(ARGV[2])
local fit
if not estimate then
  fit = 1
elseif estimate <= 0 then
  fit = n
else
  fit = math.min(n, math.floor((budget - spent - reserved) / estimate))
end
if fit < 1 or (not estimate) then
  if others then return -4 end
  fit = 1
end
redis.call('HSET', held, field, tostring(fit * (estimate or 0)))
redis.call('HINCRBYFLOAT', meta, 'reserved', tostring(fit * (estimate or 0)))
redis.call('EXPIRE', held, ARGV[4])
redis.call('HSET', chunk, 'reserved_lines', fit)
redis.call('EXPIRE', chunk, ARGV[4])
return fit
