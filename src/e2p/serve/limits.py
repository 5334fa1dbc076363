"""Per-key rate limits: requests and tokens per minute, from the key file (a tenant's default, a key's own override;
unlimited when absent), enforced in this replica's memory.

Each limited key has two token buckets (OpenAI's model): `requests_per_minute` holds up to that many requests and
refills at limit / 60 per second; `tokens_per_minute` likewise for prompt + completion tokens. A request is admitted
when its key has a request left and its token bucket is not empty; its tokens are debited when its answer is done (a
long answer may take the bucket below zero, and the key waits until it refills). The check runs on the request's
headers, before its body is read (`RateLimitMiddleware`), so a flooding key costs the server little. Every answer
to a limited key carries OpenAI's `x-ratelimit-limit-*`, `x-ratelimit-remaining-*` and `x-ratelimit-reset-*`
headers; a refused one is a 429 in OpenAI's shape with `retry-after`, answered when the key could next be admitted
or after `REFUSAL_HOLD_S`, whichever is sooner: a client could not have succeeded earlier anyway, and a client that
retries at once, again and again, then costs one cheap refusal a second instead of hundreds (each holds the GIL
that decoding needs; measured in docs/serving.md).

Several replicas each keep their own buckets: give each replica limit / replicas, or put the limit in the load
balancer.
"""
from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from dataclasses import dataclass

REFUSAL_HOLD_S = 1.0  # the longest a 429 is held before it is sent (no compute: the connection waits)
MAX_HELD_REFUSALS = 64  # beyond this many held at once, a 429 is sent at once (held ones keep connections open)


@dataclass(frozen=True)
class Limits:
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None

    @property
    def any(self) -> bool:
        return self.requests_per_minute is not None or self.tokens_per_minute is not None

    def over(self, default: "Limits") -> "Limits":
        """These limits, each one missing taken from `default` (a key's own over its tenant's)."""
        return Limits(self.requests_per_minute if self.requests_per_minute is not None else default.requests_per_minute,
                      self.tokens_per_minute if self.tokens_per_minute is not None else default.tokens_per_minute)


def duration(seconds: float) -> str:
    """OpenAI's reset format: "20ms", "1s", "6m0s"."""
    if seconds < 1:
        return f"{max(int(seconds * 1000), 0)}ms"
    s = math.ceil(seconds)
    return f"{s // 60}m{s % 60}s" if s >= 60 else f"{s}s"


class _Bucket:
    def __init__(self, per_minute: int):
        self.capacity, self.rate = float(per_minute), per_minute / 60.0
        self.level, self.at = float(per_minute), time.monotonic()

    def refill(self, now: float) -> None:
        if now > self.at:
            self.level = min(self.capacity, self.level + (now - self.at) * self.rate)
            self.at = now

    def until(self, amount: float) -> float:
        """Seconds until the bucket holds `amount`."""
        return max(amount - self.level, 0.0) / self.rate

    def headers(self, kind: str) -> dict[str, str]:
        return {f"x-ratelimit-limit-{kind}": str(int(self.capacity)),
                f"x-ratelimit-remaining-{kind}": str(max(int(self.level), 0)),
                f"x-ratelimit-reset-{kind}": duration(self.until(self.capacity))}


class RateLimiter:
    """The buckets of every limited key of this replica (thread-safe)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._buckets: dict[tuple[str, str], _Bucket] = {}

    def _bucket(self, who: str, kind: str, per_minute: int) -> _Bucket:
        bucket = self._buckets.get((who, kind))
        if bucket is None or bucket.capacity != per_minute:
            bucket = self._buckets[(who, kind)] = _Bucket(per_minute)
        return bucket

    def admit(self, who: str, limits: Limits) -> tuple[bool, dict[str, str], float]:
        """Take one request for `who` -> (admitted, the rate-limit headers, seconds to wait when refused)."""
        now, headers, wait = time.monotonic(), {}, 0.0
        with self._lock:
            requests = tokens = None
            if limits.requests_per_minute is not None:
                requests = self._bucket(who, "requests", limits.requests_per_minute)
                requests.refill(now)
                if requests.level < 1:
                    wait = max(wait, requests.until(1))
            if limits.tokens_per_minute is not None:
                tokens = self._bucket(who, "tokens", limits.tokens_per_minute)
                tokens.refill(now)
                if tokens.level < 1:
                    wait = max(wait, tokens.until(1))
            if wait == 0 and requests is not None:
                requests.level -= 1
            for kind, bucket in (("requests", requests), ("tokens", tokens)):
                if bucket is not None:
                    headers.update(bucket.headers(kind))
        return wait == 0, headers, wait

    def debit(self, who: str, limits: Limits, tokens: int) -> None:
        """`tokens` (prompt + completion) used by an answer of `who`."""
        if limits.tokens_per_minute is None or tokens <= 0:
            return
        with self._lock:
            bucket = self._bucket(who, "tokens", limits.tokens_per_minute)
            bucket.refill(time.monotonic())
            bucket.level -= tokens


class RateLimitMiddleware:
    """ASGI: a limited key's request is admitted or refused (429) on its headers alone, before its body is read, and
    every answer to it carries the rate-limit headers. `resolve(headers) -> (who, Limits) | None` names the key."""

    def __init__(self, app, limiter: RateLimiter, resolve):
        self.app, self.limiter, self.resolve = app, limiter, resolve
        self.held = 0  # refusals being held now (one event loop: no lock needed)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        from starlette.datastructures import Headers

        found = self.resolve(Headers(scope=scope))
        if found is None:
            return await self.app(scope, receive, send)
        who, limits = found
        admitted, headers, wait = self.limiter.admit(who, limits)
        if not admitted:
            hold = min(wait, REFUSAL_HOLD_S) if self.held < MAX_HELD_REFUSALS else 0.0
            wait = max(wait - hold, 0.0)  # as the client will see it, after the hold
            body = json.dumps({"error": {
                "message": f"rate limit reached for this key: retry after {duration(wait)} (its limits: "
                           f"{limits.requests_per_minute or 'unlimited'} requests and {limits.tokens_per_minute or 'unlimited'} "
                           "tokens per minute)", "type": "rate_limit_error", "param": None, "code": "rate_limit_exceeded"}})
            raw = [(b"content-type", b"application/json"), (b"retry-after", str(math.ceil(wait)).encode())]
            raw += [(k.encode(), v.encode()) for k, v in headers.items()]
            if hold > 0:
                self.held += 1
                try:
                    await asyncio.sleep(hold)
                finally:
                    self.held -= 1
            await send({"type": "http.response.start", "status": 429, "headers": raw})
            await send({"type": "http.response.body", "body": body.encode()})
            return
        scope.setdefault("state", {})["rate_limit"] = (who, limits)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": list(message.get("headers", [])) +
                           [(k.encode(), v.encode()) for k, v in headers.items()]}
            await send(message)

        await self.app(scope, receive, send_with_headers)
