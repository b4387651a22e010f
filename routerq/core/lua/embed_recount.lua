-- A run (started or started again) counts as done exactly the texts that have a vector, and none failed
-- (a re-run sends the failed ones again): whatever an interrupted run left, the count is the truth.
-- KEYS: run, vec
redis.call('HSET', KEYS[1], 'done', redis.call('HLEN', KEYS[2]), 'failed', 0)
return 1
