-- Give back a line's reserved cost (see _GO): every path that ends a line's call runs this.
local function release(meta, held, index)
  local est = redis.call('HGET', held, index)
  if not est then return end
  redis.call('HDEL', held, index)
  if redis.call('HLEN', held) == 0 then
    redis.call('HDEL', meta, 'reserved')
  else
    redis.call('HINCRBYFLOAT', meta, 'reserved', tostring(-tonumber(est)))
  end
end
