-- Store a request's new vectors (HSETNX: a redelivered request never double-counts) and count them in
-- the same step: a worker killed between the two would leave vectors that a re-run neither sends again
-- nor counts, and the run would never reach its total.
-- KEYS: vec, claim, run, counters; ARGV: ttl, tokens, cost, then index, raw vector pairs.
local tokens, cost = tonumber(ARGV[2]), tonumber(ARGV[3])
local added = 0
for i = 4, #ARGV, 2 do
  added = added + redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1])
  redis.call('HDEL', KEYS[2], ARGV[i])
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
if added > 0 then
  redis.call('HINCRBY', KEYS[3], 'done', added)
  redis.call('HINCRBY', KEYS[3], 'prompt_tokens', tokens)
  redis.call('HINCRBYFLOAT', KEYS[3], 'cost', cost)
  redis.call('HINCRBY', KEYS[4], 'texts:embedded', added)
  redis.call('HINCRBY', KEYS[4], 'prompt_tokens', tokens)
  redis.call('HINCRBYFLOAT', KEYS[4], 'cost', cost)
end
return added
