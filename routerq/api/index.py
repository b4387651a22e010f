"""A tenant's files or batches, newest first, paged the way OpenAI's list endpoints page (`after`,
`limit`, `has_more`).

Keys:
  routerq:api:{kind}:{tenant}   zset  ids by creation time
"""

from __future__ import annotations

import redis

from routerq.core.redis_client import as_text


class TenantIndex:
    def __init__(self, client: redis.Redis, kind: str, ttl: int) -> None:
        self._redis = client
        self._kind = kind
        self._ttl = ttl

    def _key(self, tenant: str) -> str:
        return f"routerq:api:{self._kind}:{tenant}"

    def add(self, tenant: str, ident: str, created_at: float) -> None:
        pipe = self._redis.pipeline()
        pipe.zadd(self._key(tenant), {ident: created_at})
        pipe.zremrangebyscore(self._key(tenant), "-inf", created_at - self._ttl)  # expired with their state
        pipe.expire(self._key(tenant), self._ttl)
        pipe.execute()

    def remove(self, tenant: str, ident: str) -> None:
        self._redis.zrem(self._key(tenant), ident)

    def owns(self, tenant: str, ident: str) -> bool:
        return self._redis.zscore(self._key(tenant), ident) is not None

    def page(self, tenant: str, after: str | None, limit: int) -> tuple[list[str], bool]:
        """Up to `limit` ids after `after` (newest first), and whether more follow."""
        start = 0
        if after:
            rank = self._redis.zrevrank(self._key(tenant), after)
            start = 0 if not isinstance(rank, int) else rank + 1
        ids = [as_text(i) for i in self._redis.zrevrange(self._key(tenant), start, start + limit)]
        return ids[:limit], len(ids) > limit
