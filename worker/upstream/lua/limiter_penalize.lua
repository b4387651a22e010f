-- KEYS: state hash per scope; ARGV: now_ms, cooldown_ms, recovery_ms
local now, cooldown, recovery = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
for _, st in ipairs(KEYS) do
  local state = redis.call('HMGET', st, 'factor', 'last429', 'cooldown')
  local factor = 1
  if state[1] then
    factor = math.min(1, tonumber(state[1]) * math.pow(2, (now - tonumber(state[2])) / recovery))
  end
  local until_ms = math.max(tonumber(state[3] or 0), now + cooldown)
  redis.call('HSET', st, 'factor', math.max(0.05, factor / 2), 'last429', now, 'cooldown', until_ms)
  redis.call('PEXPIRE', st, 3600000)
end
return 1
