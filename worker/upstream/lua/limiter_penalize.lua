-- Upstream refused a call (a 429, or a temporary 402 in-flight budget): slow the model down for
-- every worker. KEYS: the model scope's state hash, its recent grants and answered calls zsets.
-- ARGV: now_ms, the refused call's grant time (ms), beta, cooldown_ms (0: none), source, guard_ms,
-- retry_after_ms, min_seed, memory_ms. Returns the rate now ('0': not paced).
-- One decrease per congestion: a refusal of a call granted before the last decrease, or within
-- guard_ms of it (upstream's window still holds what was sent at the old rate), is counted, not acted on. The first refusal seeds the rate from the grants of the
-- second before the refused call's. A cooldown (a long Retry-After: the limit is a window of minutes, not a rate) stops
-- every call of the model until it ends. Returns the rate now.
local st, recent = KEYS[1], KEYS[2]
local now, granted, beta, cooldown = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
redis.call('HINCRBY', st, 'refused', 1)
redis.call('HSET', st, 'refused_at', now)  -- no increase while refusals come in
redis.call('HINCRBY', st, 'refused:' .. ARGV[5], 1)
if cooldown > 0 then
  local until_ms = math.max(tonumber(redis.call('HGET', st, 'cooldown') or 0), now + cooldown)
  redis.call('HSET', st, 'cooldown', until_ms)
end
redis.call('PEXPIRE', st, tonumber(ARGV[9]))  -- a model's rate is forgotten this long after its last refusal
local rate = tonumber(redis.call('HGET', st, 'rate') or '')
local decreased = tonumber(redis.call('HGET', st, 'decreased') or 0)
if rate and (granted < decreased or now - decreased < tonumber(ARGV[6])) then return tostring(rate) end
if rate then
  -- when upstream answered far fewer in the last second than the rate (its limit fell), a cut starts
  -- from what it answered, but never below half the rate (a second just after a pause is thin)
  local answered = redis.call('ZCOUNT', KEYS[3], now - 1000, now)
  if answered < 0.6 * rate then rate = math.max(answered, rate / 2) end
else
  -- the first: what upstream had admitted when it refused, the grants of the second before this one;
  -- a refusal amid a trickle of calls (fewer than min_seed that second) says nothing of a rate
  rate = redis.call('ZCOUNT', recent, granted - 1000, granted) - 1
  if rate < tonumber(ARGV[8]) then return '0' end
  -- and until its Retry-After, upstream's window is full of the unpaced burst: nobody sends
  local first = now + tonumber(ARGV[7])
  redis.call('HSET', st, 'cooldown', math.max(tonumber(redis.call('HGET', st, 'cooldown') or 0), first))
end
rate = math.max(1, rate * beta)
redis.call('HSET', st, 'rate', tostring(rate), 'decreased', now)
return tostring(rate)
