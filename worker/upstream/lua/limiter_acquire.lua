-- May a call start now? KEYS: 7 per scope (requests zset, tokens zset, in-flight zset, state hash,
-- grants of the last two seconds zset, answered calls zset, refused calls zset). ARGV: now_ms, window_ms,
-- lease, lease_expiry_ms, tokens, increase_ms, increase_step, burst_ms, quiet_ms, recover_steps, then
-- per scope: max requests, max tokens, max in flight, discovers (0/1). Returns 0 (granted) or how many ms to wait.
-- Configured limits (requests and tokens per window, calls in flight) are hard caps. A scope that
-- discovers also paces calls at its discovered rate (state.rate, calls per second, set by
-- limiter_penalize.lua at the first refusal): at most that many grants in any second, spaced evenly
-- (a grant's theoretical time, state.tat, moves on by 1/rate; a grant may come at most burst_ms ahead
-- of it). While callers press that rate, no refusal came in the last increase_ms and no probe holds it
-- (state.hold), it grows by rate * step every increase_ms, and faster the longer upstream has refused
-- nothing: step * (1 + (t / quiet_ms)^2) after t ms without a refusal (t counted up to 2 quiet_ms),
-- and recover_steps times the step while it is under 0.95 of the rate the last cut began from
-- (state.cut_from: the sawtooth's dip is short, its peak approached gently).
local now, window, lease = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local lease_until, tokens = tonumber(ARGV[4]), tonumber(ARGV[5])
local increase_ms, step, burst, quiet = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local recover = tonumber(ARGV[10])
local wait = 0
local scopes = #KEYS / 7
local rates = {}
for s = 0, scopes - 1 do
  local req, tok, fly, st, recent = KEYS[s*7+1], KEYS[s*7+2], KEYS[s*7+3], KEYS[s*7+4], KEYS[s*7+5]
  local max_req, max_tok = tonumber(ARGV[11+s*4]), tonumber(ARGV[12+s*4])
  local max_fly, discovers = tonumber(ARGV[13+s*4]), ARGV[14+s*4] == '1'
  local state = redis.call('HMGET', st, 'cooldown', 'rate', 'increased', 'refused_at', 'hold', 'tat', 'cut_from')
  local cooldown = tonumber(state[1] or 0)
  if cooldown > now then wait = math.max(wait, cooldown - now) end
  if max_req > 0 then
    redis.call('ZREMRANGEBYSCORE', req, '-inf', now - window)
    local count = redis.call('ZCARD', req)
    if count >= max_req then
      local nth = redis.call('ZRANGE', req, count - max_req, count - max_req, 'WITHSCORES')
      wait = math.max(wait, tonumber(nth[2]) + window - now)
    end
  end
  if max_tok > 0 then
    redis.call('ZREMRANGEBYSCORE', tok, '-inf', now - window)
    local used = 0
    for _, member in ipairs(redis.call('ZRANGE', tok, 0, -1)) do
      used = used + tonumber(string.match(member, ':(%d+)$'))
    end
    if used > 0 and used + tokens > max_tok then
      local oldest = redis.call('ZRANGE', tok, 0, 0, 'WITHSCORES')
      wait = math.max(wait, tonumber(oldest[2]) + window - now)
    end
  end
  if max_fly > 0 then
    redis.call('ZREMRANGEBYSCORE', fly, '-inf', now)
    if redis.call('ZCARD', fly) >= max_fly then wait = math.max(wait, 25) end
  end
  local rate = tonumber(state[2] or '')
  if discovers and rate then
    rates[s] = {rate, tonumber(state[6] or 0)}
    local pace = rates[s][2] - burst - now  -- evenly spaced
    local allowed = math.max(1, math.floor(rate))
    local count = redis.call('ZCOUNT', recent, now - 1000, '+inf')
    if count >= allowed then  -- and never more than the rate in any second
      local nth = redis.call('ZRANGEBYSCORE', recent, now - 1000, '+inf', 'WITHSCORES', 'LIMIT', count - allowed, 1)
      pace = math.max(pace, tonumber(nth[2]) + 1000 - now)
    end
    if pace > 0 then
      local quiet_for = now - tonumber(state[4] or 0)
      local since = math.min(now - tonumber(state[3] or 0), quiet_for, now - tonumber(state[5] or 0))
      if since >= increase_ms then
        local grow = step * (1 + (math.min(quiet_for, 2 * quiet) / quiet) ^ 2)
        if rate < 0.95 * tonumber(state[7] or 0) then grow = math.max(grow, step * recover) end
        redis.call('HSET', st, 'rate', tostring(rate * (1 + grow)), 'increased', now)
      end
      wait = math.max(wait, pace)
    end
  end
end
if wait > 0 then return math.ceil(wait) end
for s = 0, scopes - 1 do
  local req, tok, fly, st, recent = KEYS[s*7+1], KEYS[s*7+2], KEYS[s*7+3], KEYS[s*7+4], KEYS[s*7+5]
  local max_req, max_tok, max_fly = tonumber(ARGV[11+s*4]), tonumber(ARGV[12+s*4]), tonumber(ARGV[13+s*4])
  if max_req > 0 then
    redis.call('ZADD', req, now, lease)
    redis.call('PEXPIRE', req, window * 2 + 600000)
  end
  if max_tok > 0 then
    redis.call('ZADD', tok, now, lease .. ':' .. tokens)
    redis.call('PEXPIRE', tok, window * 2 + 600000)
  end
  if max_fly > 0 then
    redis.call('ZADD', fly, lease_until, lease)
    redis.call('PEXPIRE', fly, lease_until - now + 600000)
  end
  if ARGV[14+s*4] == '1' then
    redis.call('ZADD', recent, now, lease)
    redis.call('ZREMRANGEBYSCORE', recent, '-inf', now - 2000)
    redis.call('PEXPIRE', recent, 3000)
    redis.call('HINCRBY', st, 'granted', 1)
    if rates[s] then
      redis.call('HSET', st, 'tat', tostring(math.max(rates[s][2], now) + 1000 / rates[s][1]))
    end
    if redis.call('PTTL', st) < 0 then redis.call('PEXPIRE', st, 3600000) end  -- counters of an unpaced model
  end
end
return 0
