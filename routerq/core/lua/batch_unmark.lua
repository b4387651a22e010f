-- A line that will not run now (a retry, a skip): off the running set, its reservation given back.
redis.call('SREM', KEYS[2], ARGV[1])
release(KEYS[1], KEYS[3], ARGV[1], KEYS[4])
