-- A call is over: its in-flight lease ends, its token estimate is replaced by what it used, and an
-- answered call (not refused) counts as admitted where the scope discovers its rate.
-- KEYS: 7 per scope (limiter_acquire.lua); ARGV: lease, estimated tokens, actual tokens, now_ms,
-- answered (0/1), how long answered calls are kept (ms: a probe's verdict reads that far back), then
-- per scope whether it discovers (0/1)
local now, keep = tonumber(ARGV[4]), tonumber(ARGV[6])
for s = 0, #KEYS / 7 - 1 do
  local tok, fly, ok = KEYS[s*7+2], KEYS[s*7+3], KEYS[s*7+6]
  if ARGV[5] == '1' and ARGV[7 + s] == '1' then
    redis.call('ZADD', ok, now, ARGV[1])
    redis.call('ZREMRANGEBYSCORE', ok, '-inf', now - keep)
    redis.call('PEXPIRE', ok, keep + 1000)
  end
  redis.call('ZREM', fly, ARGV[1])
  local estimated = ARGV[1] .. ':' .. ARGV[2]
  local at = redis.call('ZSCORE', tok, estimated)
  if at then
    redis.call('ZREM', tok, estimated)
    redis.call('ZADD', tok, at, ARGV[1] .. ':' .. ARGV[3])
  end
end
return 1
