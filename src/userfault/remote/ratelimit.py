"""Per-peer limits on failed authentication: a token bucket, and a growing refusal delay.

Each peer (an IP address, or a Unix user) has a bucket of ``burst`` tokens that refills at
``refill_per_second``. A failed handshake takes a token and its refusal is sent only after a
delay that doubles with each consecutive failure (``base_delay`` up to ``max_delay``); a
success resets the delay (not the bucket). A peer with an empty bucket is refused at once,
before it is sent a challenge. The table is bounded: past ``max_peers`` entries, peers whose
bucket is full are forgotten first (they are indistinguishable from new ones), then the
least recently seen.

The clock is passed in, so the policy is tested without waiting.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

__all__ = ["FailureLimiter", "RateLimit"]


@dataclass(frozen=True)
class RateLimit:
    """The policy of a :class:`FailureLimiter` (see the module docstring)."""

    burst: int = 10
    refill_per_second: float = 1 / 30
    base_delay: float = 0.1
    max_delay: float = 5.0
    max_peers: int = 4096

    def __post_init__(self) -> None:
        if self.burst < 1:
            raise ValueError(f"burst must be at least 1, not {self.burst}")
        if self.refill_per_second < 0 or self.base_delay < 0 or self.max_delay < self.base_delay:
            raise ValueError("refill_per_second and base_delay must be >= 0 and max_delay >= "
                             "base_delay")
        if self.max_peers < 1:
            raise ValueError(f"max_peers must be at least 1, not {self.max_peers}")


class _Peer:
    __slots__ = ("failures", "stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp
        self.failures = 0  # consecutive failures since the last success


class FailureLimiter:
    """Tracks failed handshakes per peer; not thread-safe (the server's event loop owns it)."""

    def __init__(self, policy: RateLimit | None = None) -> None:
        self.policy = policy or RateLimit()
        self._peers: OrderedDict[str, _Peer] = OrderedDict()

    def _peer(self, key: str, now: float) -> _Peer:
        p = self.policy
        peer = self._peers.get(key)
        if peer is None:
            peer = _Peer(float(p.burst), now)
            self._peers[key] = peer
            if len(self._peers) > p.max_peers:
                self._evict(now)
        else:
            peer.tokens = min(float(p.burst),
                              peer.tokens + (now - peer.stamp) * p.refill_per_second)
            peer.stamp = now
            self._peers.move_to_end(key)
        return peer

    def _evict(self, now: float) -> None:
        p = self.policy
        for key, peer in list(self._peers.items())[:-1]:
            if peer.tokens + (now - peer.stamp) * p.refill_per_second >= p.burst:
                del self._peers[key]
                if len(self._peers) <= p.max_peers:
                    return
        while len(self._peers) > p.max_peers:
            self._peers.popitem(last=False)

    def allowed(self, key: str, now: float) -> bool:
        """Whether ``key`` may try to authenticate now (it has a token left)."""
        return self._peer(key, now).tokens >= 1.0

    def failure(self, key: str, now: float) -> float:
        """Record a failed handshake; return the seconds to wait before refusing it."""
        peer = self._peer(key, now)
        peer.tokens = max(0.0, peer.tokens - 1.0)
        peer.failures += 1
        p = self.policy
        return float(min(p.max_delay, p.base_delay * 2.0 ** min(peer.failures - 1, 64)))

    def success(self, key: str, now: float) -> None:
        """Record a successful handshake: the refusal delay starts over."""
        self._peer(key, now).failures = 0

    def __len__(self) -> int:
        return len(self._peers)
