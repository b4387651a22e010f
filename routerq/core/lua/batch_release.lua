-- A line's call is over (or never started): it leaves the set of lines calling upstream, and gives
-- back its reserved cost (see batch_go.lua). Every path that ends a line's call runs this.
local function release(meta, held, index, calling)
  redis.call('SREM', calling, index)
  local est = redis.call('HGET', held, index)
  if not est then return end
  redis.call('HDEL', held, index)
  if redis.call('HLEN', held) == 0 then
    redis.call('HDEL', meta, 'reserved')
  else
    redis.call('HINCRBYFLOAT', meta, 'reserved', tostring(-tonumber(est)))
  end
end
