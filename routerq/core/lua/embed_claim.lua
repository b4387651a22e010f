-- Take the texts of a request that have no vector and that no other live request holds: a text is sent
-- by one request at a time, even when a re-run's request and a dead worker's restored one run together.
-- A claim lasts as long as a call may (ARGV[2] s); the request that holds it may always take it again
-- (a retry, a redelivery of the same message).
local owner, hold = ARGV[1], tonumber(ARGV[2])
local now = tonumber(redis.call('TIME')[1])
local taken = {}
for i = 4, #ARGV do
  local index = ARGV[i]
  if redis.call('HEXISTS', KEYS[1], index) == 0 then
    local held = redis.call('HGET', KEYS[2], index)
    local free = not held
    if held then
      local space = string.find(held, ' ', 1, true)
      free = string.sub(held, space + 1) == owner or tonumber(string.sub(held, 1, space - 1)) <= now
    end
    if free then
      redis.call('HSET', KEYS[2], index, (now + hold) .. ' ' .. owner)
      taken[#taken + 1] = index
    end
  end
end
redis.call('EXPIRE', KEYS[2], ARGV[3])
return taken
