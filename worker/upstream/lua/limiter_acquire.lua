-- KEYS: 4 per scope (requests zset, tokens zset, in-flight zset, state hash)
-- ARGV: now_ms, window_ms, lease, lease_expiry_ms, tokens, recovery_ms, then 3 limits per scope
local now, window, lease = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local lease_until, tokens, recovery = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local wait = 0
local scopes = #KEYS / 4
for s = 0, scopes - 1 do
  local req, tok, fly, st = KEYS[s*4+1], KEYS[s*4+2], KEYS[s*4+3], KEYS[s*4+4]
  local max_req, max_tok, max_fly = tonumber(ARGV[7+s*3]), tonumber(ARGV[8+s*3]), tonumber(ARGV[9+s*3])
  local state = redis.call('HMGET', st, 'factor', 'last429', 'cooldown')
  local cooldown = tonumber(state[3] or 0)
  if cooldown > now then wait = math.max(wait, cooldown - now) end
  local factor = 1
  if state[1] then
    factor = math.min(1, tonumber(state[1]) * math.pow(2, (now - tonumber(state[2])) / recovery))
  end
  redis.call('ZREMRANGEBYSCORE', req, '-inf', now - window)
  redis.call('ZREMRANGEBYSCORE', tok, '-inf', now - window)
  redis.call('ZREMRANGEBYSCORE', fly, '-inf', now)
  if max_req > 0 then
    local allowed = math.max(1, math.floor(max_req * factor))
    if redis.call('ZCARD', req) >= allowed then
      local oldest = redis.call('ZRANGE', req, 0, 0, 'WITHSCORES')
      local count = redis.call('ZCARD', req)
      local nth = redis.call('ZRANGE', req, count - allowed, count - allowed, 'WITHSCORES')
      wait = math.max(wait, tonumber(nth[2] or oldest[2]) + window - now)
    end
  end
  if max_tok > 0 then
    local used = 0
    for _, member in ipairs(redis.call('ZRANGE', tok, 0, -1)) do
      used = used + tonumber(string.match(member, ':(%d+)$'))
    end
    if used > 0 and used + tokens > max_tok then
      local oldest = redis.call('ZRANGE', tok, 0, 0, 'WITHSCORES')
      wait = math.max(wait, tonumber(oldest[2]) + window - now)
    end
  end
  if max_fly > 0 and redis.call('ZCARD', fly) >= max_fly then
    wait = math.max(wait, 25)
  end
end
if wait > 0 then return wait end
for s = 0, scopes - 1 do
  local req, tok, fly = KEYS[s*4+1], KEYS[s*4+2], KEYS[s*4+3]
  redis.call('ZADD', req, now, lease)
  redis.call('ZADD', tok, now, lease .. ':' .. tokens)
  redis.call('ZADD', fly, lease_until, lease)
  for _, k in ipairs({req, tok, fly}) do redis.call('PEXPIRE', k, math.floor(window * 2 + 600000)) end
end
return 0
