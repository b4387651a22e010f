-- A call is over: its in-flight lease ends and its token estimate is replaced by what it used.
-- KEYS: 5 per scope (limiter_acquire.lua); ARGV: lease, estimated tokens, actual tokens
for s = 0, #KEYS / 5 - 1 do
  local tok, fly = KEYS[s*5+2], KEYS[s*5+3]
  redis.call('ZREM', fly, ARGV[1])
  local estimated = ARGV[1] .. ':' .. ARGV[2]
  local at = redis.call('ZSCORE', tok, estimated)
  if at then
    redis.call('ZREM', tok, estimated)
    redis.call('ZADD', tok, at, ARGV[1] .. ':' .. ARGV[3])
  end
end
return 1
