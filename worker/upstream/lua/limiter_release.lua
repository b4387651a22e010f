-- KEYS: 4 per scope; ARGV: lease, estimated tokens, actual tokens
for s = 0, #KEYS / 4 - 1 do
  local tok, fly = KEYS[s*4+2], KEYS[s*4+3]
  redis.call('ZREM', fly, ARGV[1])
  local estimated = ARGV[1] .. ':' .. ARGV[2]
  local at = redis.call('ZSCORE', tok, estimated)
  if at then
    redis.call('ZREM', tok, estimated)
    redis.call('ZADD', tok, at, ARGV[1] .. ':' .. ARGV[3])
  end
end
return 1
