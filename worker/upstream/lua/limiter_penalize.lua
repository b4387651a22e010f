-- Upstream refused a call (a 429, or a temporary 402 in-flight budget): slow the model down for
-- every worker, unless the refusal is one of the share a flaky provider refuses at any pace.
-- KEYS: the model scope's state hash, its recent grants, answered calls and refused calls zsets.
-- ARGV: now_ms, the refused call's grant time (ms), beta, cooldown_ms (0: none), source, guard_ms,
-- retry_after_ms, min_seed, memory_ms, the refused call's lease, noise_min, episode_gap_ms, noise_z,
-- probe_ratio, probe_depth, probe_calls, keep_ms (how long answered and refused calls are kept).
-- Returns the rate now ('0': not paced).
--
-- One decrease per congestion: a refusal of a call granted before the last decrease, or within
-- guard_ms of it (upstream's window still holds what was sent at the old rate), is counted, not
-- acted on. The first refusal seeds the rate from the grants of the second before the refused call's
-- (unless that second saw fewer than min_seed calls: a trickle says nothing of a rate).
--
-- Cuts each within episode_gap_ms of the last are an episode. One that began with at least noise_min
-- (and under 40 %: more is a limit that fell) of the calls refused is a probe: from its second cut the
-- rate is held (no increase), so it only falls; once it is down to probe_depth of where the episode
-- began it is cut no more, and the calls that end from guard_ms after its last cut (at least
-- probe_calls of them, however long they take at that rate) give the verdict. A limit refuses a much
-- smaller share of them than it did at the episode's start (none, if the rate is now under it): the
-- next congestion starts a new episode. A share that stayed (at least probe_ratio of the first, and
-- at least noise_min) is refused at any pace: the model is not paced any more and that share becomes
-- its noise; refusals within noise_z standard deviations of it neither seed a rate, nor cut one, nor
-- hold its increase. Shares are counted over at least probe_calls calls (the last 2 s, or as many
-- seconds back as that takes): at a few calls a second, a share of one or two seconds is chance.

-- A cooldown (a long Retry-After: the limit is a window of minutes, not a rate) stops every call of
-- the model until it ends.
local st, recent, ok, no = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local now, granted, beta, cooldown = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local guard, min_seed, noise_min, gap = tonumber(ARGV[6]), tonumber(ARGV[8]), tonumber(ARGV[11]), tonumber(ARGV[12])
local probe_calls, keep = tonumber(ARGV[16]), tonumber(ARGV[17])
redis.call('HINCRBY', st, 'refused', 1)
redis.call('HINCRBY', st, 'refused:' .. ARGV[5], 1)
redis.call('ZADD', no, now, ARGV[10])
redis.call('ZREMRANGEBYSCORE', no, '-inf', now - keep)
redis.call('PEXPIRE', no, keep + 1000)
if cooldown > 0 then
  local until_ms = math.max(tonumber(redis.call('HGET', st, 'cooldown') or 0), now + cooldown)
  redis.call('HSET', st, 'cooldown', until_ms)
end
redis.call('PEXPIRE', st, tonumber(ARGV[9]))  -- a model's rate is forgotten this long after its last refusal

-- the refused share of the last two seconds' calls, or of as many seconds back as hold min_calls
local function refused_share(min_calls)
  local window = 2000
  while true do
    local refused = redis.call('ZCOUNT', no, now - window, now)
    local calls = refused + redis.call('ZCOUNT', ok, now - window, now)
    if calls >= min_calls or window * 2 > keep then return refused, calls end
    window = window * 2
  end
end

-- against the provider's usual share, the last two seconds' refusals (less noisy than one)
local refused2, calls2 = refused_share(0)
local state = redis.call('HMGET', st, 'rate', 'noise', 'decreased', 'episode_rate', 'episode_share')
local rate, noise = tonumber(state[1] or ''), tonumber(state[2] or 0)
if noise > 0 and refused2 <= calls2 * noise + tonumber(ARGV[13]) * math.sqrt(calls2 * noise * (1 - noise)) + 1 then
  return tostring(rate or 0)
end
redis.call('HSET', st, 'refused_at', now)  -- no increase while refusals come in

if not rate then
  rate = redis.call('ZCOUNT', recent, granted - 1000, granted) - 1
  if rate < min_seed then return '0' end
  -- until its Retry-After, upstream's window is full of the unpaced burst: nobody sends
  local first = now + tonumber(ARGV[7])
  redis.call('HSET', st, 'cooldown', math.max(tonumber(redis.call('HGET', st, 'cooldown') or 0), first))
  local r, c = refused_share(probe_calls)
  redis.call('HSET', st, 'episode_rate', tostring(rate), 'episode_share', tostring(r / c))  -- its first cut
  rate = math.max(1, rate * beta)
  redis.call('HSET', st, 'rate', tostring(rate), 'decreased', now)
  return tostring(rate)
end

local decreased = tonumber(state[3] or 0)
local first_rate, first_share = tonumber(state[4] or 0), tonumber(state[5] or 0)
local probe = first_share >= noise_min and first_share < 0.4
-- the time probe_calls calls take at the rate (ms), within what is kept of them
local gather = math.min(1000 * probe_calls / rate, keep / 2)
if probe and rate <= tonumber(ARGV[15]) * first_rate and now - decreased <= guard + 2 * gather + gap then
  -- a probe at its depth: no more cuts (nor increases) until the calls that ended since its last cut
  -- settled give their verdict
  redis.call('HSET', st, 'hold', math.max(now + gap, decreased + guard + 1.5 * gather))
  local since = decreased + guard
  local refused_since = redis.call('ZCOUNT', no, since, now)
  local calls_since = refused_since + redis.call('ZCOUNT', ok, since, now)
  if calls_since < probe_calls then return tostring(rate) end
  local at_depth = refused_since / calls_since
  if at_depth >= noise_min and at_depth >= tonumber(ARGV[14]) * first_share then
    -- cutting did not lower the refused share: not a limit, nothing to pace until refusals beyond
    -- this share (kept one standard error up: an estimate from a few dozen calls that came out low
    -- would read the provider's usual refusals as a limit again) seed a rate again
    redis.call('HDEL', st, 'rate', 'decreased', 'hold', 'episode_rate', 'episode_share', 'tat', 'cut_from')
    redis.call('HSET', st, 'noise', tostring(at_depth + math.sqrt(at_depth * (1 - at_depth) / calls_since)))
    return '0'
  end
  -- the share fell: a limit, and no earlier noise explains these refusals; the next congestion starts
  -- a new episode
  redis.call('HDEL', st, 'noise', 'hold', 'episode_rate', 'episode_share')
  redis.call('HSET', st, 'decreased', now - 2 * gap - 1)
  return tostring(rate)
end
if granted < decreased or now - decreased < guard then return tostring(rate) end
local going_on = now - decreased <= gap
local refused_n, calls_n = refused_share(probe_calls)
local share = refused_n / calls_n
if not going_on or (not probe and share >= noise_min and share < 0.4) then
  -- a new episode; or one that began as a limit that fell (or by chance over 40 %) and now refuses
  -- a share a flaky provider might: a probe from here
  probe = false  -- until this episode's second cut
  redis.call('HSET', st, 'episode_rate', tostring(rate), 'episode_share', tostring(share))
end

-- a cut starts from the rate, or from what upstream answered in the last second when it refused over
-- 40 % of the calls (its limit fell: a new episode from there, not a probe), but never below half (a
-- step, not a collapse); below three trickles a second, 40 % refused is chance
local refused = redis.call('ZCOUNT', no, now - 1000, now)
local calls = refused + redis.call('ZCOUNT', ok, now - 1000, now)
local base = rate
if refused > 0.4 * calls and calls >= 3 * min_seed then
  base = math.max(calls - refused, rate / 2)
  redis.call('HSET', st, 'episode_rate', tostring(base * beta), 'episode_share', tostring(share))
elseif going_on and probe then
  redis.call('HSET', st, 'hold', now + gap)  -- a probe's rate only falls
end
rate = math.max(1, base * beta)
redis.call('HSET', st, 'rate', tostring(rate), 'decreased', now, 'cut_from', tostring(base))
return tostring(rate)
