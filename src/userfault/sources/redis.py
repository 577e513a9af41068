"""Pages stored in Redis (one key per page), standalone or Redis Cluster.

Key layout (``prefix`` defaults to ``"userfault:"``, ``page_size`` to 4096)::

    {prefix}meta              JSON {"size": <total bytes>, "page_size": <bytes per key>,
                                    "version": 2, "generation": "<16 hex digits>"}
    {prefix}{generation}:{i}  the bytes of [i * page_size, (i + 1) * page_size), i in decimal

Objects are versioned. :func:`upload` writes a new *generation* under keys of its own, then
swaps the meta key to it (one atomic ``SET ... GET``), then deletes the previous generation's
keys. A :class:`RedisSource` pins the generation it opened (and a pager process gets that pin
with the pickled source), so its pages can only ever come from that one upload: once the old
generation is deleted its reads fail with a :class:`~userfault.errors.SourceError` saying the
object was uploaded again (naming both generations), never a mix of two uploads. (While an
upload runs, Redis holds both generations: plan memory for twice the object.) One uploader at a
time per prefix.

Data without a generation (meta ``"version": 1`` from older uploads, or no meta key at all when
``size=`` is given) uses the unversioned layout ``{prefix}{i}``: nothing tells two versions
apart there, so writing new pages over a live object mixes them. A source on such data still
notices an upload of a new generation over it (its meta key appears or changes) when a page
key is missing.

A page value holds the *leading* bytes of its page: bytes past the end of the value are zeros.
So an empty value is an all-zero page (what :func:`upload` writes for zero pages), the last
page is ``size % page_size`` bytes long (or a full page), and a value longer than ``page_size``
is an error. A *missing* key is an error by default (``missing="error"``): the data was never
uploaded, was evicted, or its node is gone, and serving zeros would be silent corruption.
``missing="zero"`` is an explicit opt-in for sparse data whose absent pages are zero.

On a cluster the page keys spread over all masters (data bigger than one machine); put a hash
tag in the prefix (``"{vm1}:"``) to keep one object on one node instead. ``read_many`` fetches
all the keys of a batch with pipelined ``MGET`` over a lean RESP client of its own (pooled raw
connections): on a cluster one ``MGET`` per hash slot (CRC16 of the key, hash tags honoured),
one pipeline per master, all sent before any reply is read. A ``MOVED``/``ASK`` reply or a
master unreachable refreshes the slot map (redis-py's) and retries once. (``rediss://`` and
other URLs the lean client does not speak are read through redis-py.) Pages of which a batch
wants at most a quarter (a tensor's rows: the scattered runs of a working set) are read with a
pipelined ``GETRANGE`` per part, not the whole value (on a cluster, one pipeline per master;
a redirection sends the batch to the ``MGET`` path, which follows it).

Writes (``write_from``, what a ``writable=True`` pager calls to write pages back) go to the
pinned generation, one pipeline of ``SET``/``SETRANGE`` per master. With ``replicas`` > 0
(the default on a cluster) each of those pipelines ends in ``WAIT``, and the write counts only
once enough replicas acknowledged it: in their memory, not on disk (docs/pagers.md, "Writing
back to Redis"). ``WAIT`` is issued per ``write_from``, not in a ``flush()``: the engine
counts a page written when ``write_from`` returns, and ``WAIT`` vouches only for the writes of
its own connection.

The source is picklable (constructor arguments only) and fork-safe: the client is created
lazily in the process that uses it, and again after a fork.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import secrets
import socket
import threading
import time
import traceback
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, TypedDict

from userfault._files import open_regular
from userfault.errors import SourceError

__all__ = ["RedisSource", "upload"]

_MGET_BATCH = 512  # keys per MGET in a pipeline
_SLOTS = 16384  # hash slots of a Redis Cluster
# A server trickling a reply slower than this (after the timeout's grace) fails the read.
_MIN_RATE = 16 << 10

#: What upload() accepts: a path or an object with the buffer protocol.
BufferLike = bytes | bytearray | memoryview


def _import_redis() -> Any:
    try:
        import redis
        import redis.cluster
        import redis.crc
    except ImportError as err:
        raise ImportError(
            "RedisSource needs the redis package: pip install userfault[redis]") from err
    return redis


def _check_page_size(page_size: int) -> None:
    if page_size < 4096 or page_size & (page_size - 1):
        raise ValueError(f"page_size must be a power of two >= 4096, not {page_size}")


def _make_client(url: str, cluster: bool, timeout: float) -> Any:
    redis = _import_redis()
    if cluster:
        return redis.cluster.RedisCluster.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout)
    return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)


def _describe_url(url: str) -> str:
    # Hide a password in redis://user:password@host
    if "@" in url:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.rpartition('@')[2]}"
    return url


class RedisSource:
    """Pages kept in Redis under ``{prefix}{generation}:{index}`` keys (see the module
    docstring), pinned to the generation that was current when the source opened.

    Args:
        url: ``redis://host:port/db`` (``rediss://`` for TLS); for a cluster, any one node.
        prefix: key prefix of this object.
        page_size: bytes per key, a power of two >= 4096. ``None`` takes it from the meta key,
            or 4096 when there is none. A value that contradicts the meta key is an error.
        size: total size; ``None`` reads it from ``{prefix}meta``.
        cluster: connect with :class:`redis.cluster.RedisCluster`.
        missing: ``"error"`` (default) raises :class:`SourceError` for a missing page key;
            ``"zero"`` serves missing pages as zeros (sparse data, explicit opt-in).
        timeout: socket timeout in seconds.
        replicas: a write (:meth:`write_from`) counts as done only once this many replicas of
            every master that took its keys acknowledge it (``WAIT``). ``None`` (default) is 1
            on a cluster, 0 (no ``WAIT``) on a standalone server. See :meth:`write_from`.
        wait_timeout: seconds ``WAIT`` waits for the replicas (> 0, less than ``timeout``);
            ``None`` is 1 s, or half of ``timeout`` if that is shorter.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "userfault:",
        page_size: int | None = None,
        size: int | None = None,
        cluster: bool = False,
        missing: Literal["error", "zero"] = "error",
        timeout: float = 10.0,
        replicas: int | None = None,
        wait_timeout: float | None = None,
    ) -> None:
        replicas, wait_timeout = _wait_options(replicas, wait_timeout, cluster, timeout)
        if missing not in ("error", "zero"):
            raise ValueError(f"missing must be 'error' or 'zero', not {missing!r}")
        if page_size is not None:
            _check_page_size(page_size)
        if size is not None and size < 0:
            raise ValueError(f"size must be >= 0, not {size}")
        self._url = url
        self._prefix = prefix
        self._cluster = bool(cluster)
        self._missing = missing
        self._timeout = float(timeout)
        self._replicas = replicas
        self._wait_timeout = float(wait_timeout)
        self._desc = f"{_describe_url(url)} prefix {prefix!r}"
        self._generation: str | None = None
        self._reset_process_state()
        meta = self._read_meta(required=size is None)
        if meta is not None:
            if page_size is not None and meta["page_size"] != page_size:
                raise SourceError(
                    f"RedisSource {self._desc}: page_size={page_size} was asked for but "
                    f"{prefix}meta says the data was stored with page_size "
                    f"{meta['page_size']}", source=self._desc)
            page_size = int(meta["page_size"])
            if size is None:
                size = int(meta["size"])
            self._generation = meta["generation"]
        self._page_size = page_size or 4096
        assert size is not None
        self._size = size
        self._keys = f"{prefix}{self._generation}:" if self._generation else prefix

    # -- pickling --------------------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        # The pinned generation travels: a pager process serves the upload this one opened.
        return {"url": self._url, "prefix": self._prefix, "page_size": self._page_size,
                "size": self._size, "cluster": self._cluster, "missing": self._missing,
                "timeout": self._timeout, "generation": self._generation,
                "replicas": self._replicas, "wait_timeout": self._wait_timeout}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._url = state["url"]
        self._prefix = state["prefix"]
        self._page_size = state["page_size"]
        self._size = state["size"]
        self._cluster = state["cluster"]
        self._missing = state["missing"]
        self._timeout = state["timeout"]
        self._generation = state["generation"]
        self._replicas = state["replicas"]
        self._wait_timeout = state["wait_timeout"]
        self._keys = (f"{self._prefix}{self._generation}:" if self._generation
                      else self._prefix)
        self._desc = f"{_describe_url(self._url)} prefix {self._prefix!r}"
        self._reset_process_state()

    def _reset_process_state(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._client_obj: Any = None
        # Reads on redis:// servers (standalone or cluster) use a lean RESP client of our own
        # (a page fault waits on them; redis-py costs ~50 us per call here); everything else
        # uses redis-py.
        self._lean = _lean_target(self._url)
        self._lean_idle: dict[tuple[str, int], list[_RespConn]] = {}
        # On a cluster: the master (host, port) of each hash slot, None for a slot not covered.
        self._slot_table: list[tuple[str, int] | None] | None = None

    def _client(self) -> Any:
        if self._pid != os.getpid():
            self._reset_process_state()  # forked: never reuse the parent's sockets
        if self._client_obj is None:
            with self._lock:
                if self._client_obj is None:
                    self._client_obj = _make_client(self._url, self._cluster, self._timeout)
        return self._client_obj

    # -- public API ------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._size

    @property
    def page_size(self) -> int:
        return self._page_size

    @property
    def prefix(self) -> str:
        return self._prefix

    @property
    def replicas(self) -> int:
        """How many replicas must acknowledge a write (0: none, no ``WAIT``)."""
        return self._replicas

    @property
    def generation(self) -> str | None:
        """The upload this source serves (pinned when it opened), or ``None`` for data in the
        unversioned layout."""
        return self._generation

    def __repr__(self) -> str:
        return (f"RedisSource({self._desc}, size={self._size}, page_size={self._page_size}, "
                f"cluster={self._cluster}, missing={self._missing!r}, "
                f"replicas={self._replicas})")

    def key(self, index: int) -> str:
        """The key of page ``index`` (of the pinned generation)."""
        return f"{self._keys}{index}"

    def read_into(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with ``[offset, offset + len(buf))`` (one MGET of the pages it spans)."""
        self.read_many([(offset, buf)])

    def read_many(self, requests: Sequence[tuple[int, memoryview]]) -> None:
        """Fill every ``(offset, buf)`` with one pipelined batch of MGETs for all their keys."""
        views = [(off, _bytes_view(b)) for off, b in requests]
        ps = self._page_size
        size = self._size
        # Page -> its first piece (offset in the page, destination, request); further pieces of
        # the same page (another request, or a request ending and the next starting in it).
        first: dict[int, tuple[int, memoryview, int]] = {}
        extra: dict[int, list[tuple[int, memoryview, int]]] = {}
        for r, (off, b) in enumerate(views):
            n = len(b)
            if not n:
                continue
            if off < 0 or off >= size:
                raise self._error("read", off, n,
                                  f"the range starts outside the source (size {size})")
            end = min(off + n, size)
            if end < off + n:
                b[end - off:] = bytes(off + n - end)
            pos = off
            while pos < end:
                i = pos // ps
                base = i * ps
                if pos == base and base + ps <= end:
                    # Whole pages: the bulk of a large request.
                    stop = end // ps
                    for i in range(pos // ps, stop):
                        at = i * ps - off
                        piece = (0, b[at: at + ps], r)
                        if i in first:
                            extra.setdefault(i, []).append(piece)
                        else:
                            first[i] = piece
                    pos = stop * ps
                    continue
                take = min(end, base + ps) - pos
                piece = (pos - base, b[pos - off: pos - off + take], r)
                if i in first:
                    extra.setdefault(i, []).append(piece)
                else:
                    first[i] = piece
                pos += take
        if not first:
            return
        if self._lean is not None and self._generation is not None:
            try:
                self._read_small_parts(first, extra)
            except Exception as err:  # a timeout or a server gone: the MGET would wait again
                raise self._redis_error("read", *_span(views), err) from err
            if not first:
                return
        order = list(first)
        if self._lean is not None:
            # Pages read whole into one destination go straight from the socket into it; the
            # others come back as values and are placed below.
            dsts = [None if p[0] or i in extra else p[1] for i, p in first.items()]
            left = self._mget(order, views, dsts)
        else:
            left = list(zip(order, self._mget(order, views, None), strict=True))
        bad: list[tuple[int, bytes | int | None]] = []
        if self._missing == "zero" and any(val is None for _, val in left):
            # An absent page is a zero page only while the pinned generation is current:
            # the keys of a replaced one are deleted after the new one is in place.
            replaced = self._replaced()
            if replaced is not None:
                raise self._error("read", *_span(views), replaced)
        for i, val in left:
            if val is None:
                if self._missing == "error":
                    bad.append((i, val))
                    continue
            elif isinstance(val, int) or len(val) > ps:  # an int: a length too long to read
                bad.append((i, val))
                continue
            for in_page, dst, _ in [first[i], *extra.get(i, ())]:
                take = len(dst)
                if val is None:
                    dst[:] = bytes(take)
                    continue
                have = max(0, min(len(val) - in_page, take))
                if have:
                    dst[:have] = val[in_page: in_page + have]
                if have < take:
                    dst[have:] = bytes(take - have)
        if bad:
            # The first bad page in request order, reported against the request that asked first.
            i, val = min(bad, key=lambda e: order.index(e[0]))
            off, b = views[first[i][2]]
            if val is None:
                replaced = self._replaced()
                raise self._error(
                    "read", off, len(b),
                    f"page key {self.key(i)!r} does not exist: {replaced}" if replaced else
                    f"page key {self.key(i)!r} does not exist (never uploaded, evicted "
                    "or lost); pass missing='zero' only if absent pages are zeros")
            raise self._error(
                "read", off, len(b),
                f"page key {self.key(i)!r} holds {val if isinstance(val, int) else len(val)} "
                f"bytes, more than the page size {ps}: wrong prefix or page_size?")

    def _read_small_parts(self, first: dict[int, tuple[int, memoryview, int]],
                          extra: dict[int, list[tuple[int, memoryview, int]]]) -> None:
        """Read the pages of which the requests want at most a quarter (tensor rows, norms:
        the scattered runs of a working set or of hints) with a pipelined ``GETRANGE`` of each
        part, not an ``MGET`` of the whole value; the pages served leave ``first``. A part
        that comes back shorter (a missing key, a zero page's empty value) leaves its page to
        the ``MGET``, which tells those apart, and so does a redirection or a refusal; a
        timeout or a server gone raises. Only for data ``upload()`` stored (a pinned
        generation: the page size is known, and no value is longer)."""
        small: dict[int, list[tuple[int, memoryview, int]]] = {}
        for i, piece in first.items():
            pieces = [piece, *extra.get(i, ())]
            if sum(len(q[1]) for q in pieces) <= self._page_size // 4:
                small[i] = pieces
        spans = [(i, q[0], q[0] + len(q[1])) for i, pieces in small.items() for q in pieces]
        if not spans:
            return
        try:
            values = self._getrange_lean(spans)
        except (_Retry, RedisErrorReply) as err:
            # a redirection, a reused connection the server closed, or a refusal: the MGET of
            # the same pages follows (or tells) what is wrong
            _forget_frames(err)
            return
        got = iter(values)
        for i, pieces in small.items():
            parts = [next(got) for _ in pieces]
            if all(isinstance(v, bytes) and len(v) == len(q[1])
                   for v, q in zip(parts, pieces, strict=True)):
                for v, (_, dst, _) in zip(parts, pieces, strict=True):
                    dst[:] = v  # type: ignore[assignment]
                del first[i]
                extra.pop(i, None)

    def _getrange_lean(self, spans: list[tuple[int, int, int]]) -> list[bytes | int | None]:
        """``GETRANGE`` of bytes ``[lo, hi)`` of the value of each page ``(page, lo, hi)``,
        pipelined to each server that holds some: the values in the order of ``spans``."""
        if self._pid != os.getpid():
            self._reset_process_state()
        prefix = self._keys.encode()
        keys = [b"%s%d" % (prefix, i) for i, _, _ in spans]
        plan: list[_Pipeline] = []
        for server, groups in self._route(keys):
            at = [k for g in groups for k in g]
            plan.append((server, at, [len(at)], b"".join(
                _command(b"GETRANGE", keys[k], b"%d" % spans[k][1], b"%d" % (spans[k][2] - 1))
                for k in at)))
        got = self._exchange(plan, list(range(len(spans))), [None] * len(spans),
                             read=_RespConn.read_bulks)
        return [v for _, v in sorted(got, key=lambda kv: kv[0])]

    def write_from(self, offset: int, data: memoryview) -> None:
        """Store ``data`` at ``offset`` (bytes past ``size`` are dropped).

        Whole pages are ``SET`` (an all-zero page as an empty value); parts of pages use
        ``SETRANGE``. With ``missing="error"`` a partial write to a missing page is refused.

        With ``replicas`` > 0 the pipeline of every master that took keys ends in ``WAIT
        replicas wait_timeout`` on the same connection (``WAIT`` counts that connection's
        writes only), and the call returns only once every one of them acknowledged: fewer
        acknowledgements raise :class:`SourceError` naming the node and the count (the
        master keeps what it was sent: ``WAIT`` rolls nothing back). Replicas acknowledge
        bytes in memory, not on disk.
        """
        mv = memoryview(data).cast("B") if memoryview(data).format != "B" else memoryview(data)
        if not len(mv):
            return
        if offset < 0 or offset >= self._size:
            raise self._error("write", offset, len(mv),
                              f"the range starts outside the source (size {self._size})")
        ps = self._page_size
        end = min(offset + len(mv), self._size)
        full: list[tuple[str, bytes]] = []
        partial: list[tuple[str, int, bytes]] = []
        pos = offset
        while pos < end:
            i = pos // ps
            page_end = min((i + 1) * ps, self._size)
            take = min(end, (i + 1) * ps) - pos
            chunk = bytes(mv[pos - offset: pos - offset + take])
            if pos == i * ps and pos + take >= page_end:
                full.append((self.key(i), b"" if not any(chunk) else chunk))
            else:
                partial.append((self.key(i), pos - i * ps, chunk))
            pos += take
        replaced = self._replaced()
        if replaced is not None:
            raise self._error("write", offset, len(mv), f"{replaced}; nothing was written")
        try:
            client = self._client()
            if partial and self._missing == "error":
                pipe = client.pipeline(transaction=False)
                for k, _, _ in partial:
                    pipe.exists(k)
                absent = [k for (k, _, _), e in zip(partial, pipe.execute(), strict=True) if not e]
                if absent:
                    raise self._error("write", offset, len(mv),
                                      f"partial write to missing page key {absent[0]!r}")
            short = _store(client, self._cluster, self._url, self._replicas, self._wait_ms,
                           full, partial)
        except SourceError:
            raise
        except Exception as err:
            raise self._redis_error("write", offset, len(mv), err) from err
        if short:
            raise self._error(
                "write", offset, len(mv),
                f"{_fell_short(short, self._replicas, self._wait_timeout)}; the master has "
                "the bytes, but they do not count as written (a replica down or lagging? INFO "
                "replication on that master says)")

    @property
    def _wait_ms(self) -> int:
        return _wait_ms(self._wait_timeout)

    def close(self) -> None:
        """Close the client's connections (the source stays usable)."""
        if self._pid != os.getpid():
            self._reset_process_state()
            return
        with self._lock:
            idle, self._lean_idle = self._lean_idle, {}
        for conns in idle.values():
            for c in conns:
                c.close()
        if self._client_obj is not None:
            client, self._client_obj = self._client_obj, None
            client.close()

    def __enter__(self) -> RedisSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------------

    def _error(self, what: str, offset: int, length: int, cause: str) -> SourceError:
        return SourceError.for_range("RedisSource", self._desc, what, offset, length, cause)

    def _redis_error(self, what: str, offset: int, length: int, err: BaseException) -> SourceError:
        return self._error(what, offset, length, _describe_error(err))

    def _mget(self, order: list[int], views: list[tuple[int, memoryview]],
              dsts: list[memoryview | None] | None) -> Any:
        """The values of pages ``order``. On the lean path (``dsts`` given) values that fit
        their ``dsts`` entry are written there (the rest zeroed) and only the other pages come
        back, as ``[(page, value or None)]``; otherwise a list of values or ``None``."""
        try:
            if dsts is not None:
                return self._mget_lean(order, dsts)
            keys = [self.key(i) for i in order]
            client = self._client()
            if self._cluster:
                return list(_off_stack(functools.partial(client.mget_nonatomic, keys)))
            if len(keys) <= _MGET_BATCH:
                return list(client.mget(keys))
            pipe = client.pipeline(transaction=False)
            for s in range(0, len(keys), _MGET_BATCH):
                pipe.mget(keys[s: s + _MGET_BATCH])
            out: list[bytes | None] = []
            for part in pipe.execute():
                out.extend(part)
            return out
        except Exception as err:
            raise self._redis_error("read", *_span(views), err) from err

    def _mget_lean(self, order: list[int],
                   dsts: list[memoryview | None]) -> list[tuple[int, bytes | int | None]]:
        """MGET over pooled raw connections, batches pipelined: one pipeline to a standalone
        server, or on a cluster one per master (``MGET`` per hash slot), all sent before any
        is read. A reused connection that the server closed while idle is retried once on a
        fresh one; on a cluster a redirection (``MOVED``, ``ASK``) or a master unreachable
        refreshes the slot map and retries once, and a slot still being moved (``ASK``,
        ``TRYAGAIN`` again) is read through redis-py, which follows the migration."""
        if self._pid != os.getpid():
            self._reset_process_state()
        prefix = self._keys.encode()
        keys = [b"%s%d" % (prefix, i) for i in order]
        for attempt in (0, 1):
            try:
                return self._exchange(self._plan(keys), order, dsts)
            except _Retry as err:
                _forget_frames(err)
                if attempt and _migrating(err.cause):
                    # A slot half-way through a resharding answers ASK (or TRYAGAIN) whatever
                    # the slot map says: redis-py's cluster client follows those (ASKING to
                    # the importing node); every value comes back to be placed by the caller.
                    values = _off_stack(functools.partial(
                        self._client().mget_nonatomic, [self.key(i) for i in order]))
                    return list(zip(order, values, strict=True))
                if attempt:
                    raise err.cause from err.cause.__cause__
                if self._cluster:
                    self._slot_table = None
                    with contextlib.suppress(Exception):
                        self._client().nodes_manager.initialize()
        raise AssertionError("unreachable")

    def _plan(self, keys: list[bytes]) -> list[_Pipeline]:
        """What to send where: to each server (the one of a standalone source, or each master
        of a cluster) its keys, one MGET per hash slot (of at most ``_MGET_BATCH`` keys)."""
        plan: list[_Pipeline] = []
        for server, groups in self._route(keys):
            at = [k for g in groups for k in g]
            sizes = [min(_MGET_BATCH, len(g) - s) for g in groups
                     for s in range(0, len(g), _MGET_BATCH)]
            plan.append((server, at, sizes, _mget_request([keys[k] for k in at], sizes)))
        return plan

    def _route(self, keys: list[bytes]) -> list[tuple[tuple[str, int], list[list[int]]]]:
        """Where each key lives: per server, the positions in ``keys`` of its keys, in groups
        of one hash slot (one group for the one server of a standalone source)."""
        assert self._lean is not None
        if not self._cluster:
            return [((self._lean[0], self._lean[1]), [list(range(len(keys)))])]
        key_slot = _import_redis().crc.key_slot
        table = self._slot_table
        if table is None:
            # The masters of redis-py's slot map, looked up without its lock and arguments.
            table = [None] * _SLOTS
            for at, nodes in self._client().nodes_manager.slots_cache.items():
                if nodes:
                    table[at] = (nodes[0].host, int(nodes[0].port))
            self._slot_table = table
        slots: dict[int, list[int]] = {}
        for k, key in enumerate(keys):
            slots.setdefault(key_slot(key), []).append(k)
        per_server: dict[tuple[str, int], list[list[int]]] = {}
        for slot, ks in slots.items():
            server = table[slot]
            if server is None:
                raise _Retry(ConnectionError(
                    f"hash slot {slot} is served by no master of the cluster (CLUSTER SLOTS "
                    "on a node says which are covered)"))
            per_server.setdefault(server, []).append(ks)
        return list(per_server.items())

    def _exchange(self, plan: list[_Pipeline],
                  order: list[int], dsts: list[memoryview | None],
                  read: Callable[[_RespConn, list[int], list[memoryview | None], bytes],
                                 list[tuple[int, bytes | int | None]]] | None = None
                  ) -> list[tuple[int, bytes | int | None]]:
        """Send every server its pipeline, then read the replies (``read``: MGETs by
        default); see :meth:`_mget_lean`. Raises :class:`_Retry` when trying again may
        succeed."""
        if read is None:
            read = _RespConn.read_mget_into
        assert self._lean is not None
        _, _, db, user, password = self._lean
        deadline = time.monotonic() + self._timeout + len(order) * self._page_size / _MIN_RATE
        zero = bytes(self._page_size)
        # Sent to and not yet read: (connection, server, positions, sizes, fresh).
        busy: list[tuple[_RespConn, tuple[str, int], list[int], list[int], bool]] = []
        left: list[tuple[int, bytes | int | None]] = []
        c: _RespConn | None = None
        fresh = False
        try:
            for server, at, sizes, request in plan:
                with self._lock:
                    idle = self._lean_idle.get(server)
                    c = idle.pop() if idle else None
                fresh = c is None
                if c is None:
                    c = _RespConn(*server, db, user, password, self._timeout)
                c.deadline = deadline
                c.sock.sendall(request)
                busy.append((c, server, at, sizes, fresh))
                c = None
            while busy:
                c, server, at, sizes, fresh = busy[0]
                try:
                    got = read(c, sizes, [dsts[k] for k in at], zero)
                except _TooLong as err:
                    # The rest of this stream cannot be trusted to be in step; the caller
                    # fails the read on the page too long, so the other replies do not matter.
                    return [(order[at[k]], v) for k, v in err.left] + [
                        (order[at[err.index]], err.length)]
                busy.pop(0)
                with self._lock:
                    self._lean_idle.setdefault(server, []).append(c)
                c = None
                left += [(order[at[k]], v) for k, v in got]
            return left
        except (OSError, RedisErrorReply) as err:
            if isinstance(err, _CLOSED):
                cause: BaseException = ConnectionError(str(err) or type(err).__name__)
                cause.__cause__ = err
                retry = self._cluster or not fresh
            else:
                cause = err
                retry = self._cluster and (
                    (isinstance(err, RedisErrorReply) and str(err).startswith(_REDIRECTED))
                    or (isinstance(err, OSError) and not isinstance(err, TimeoutError)))
            if retry:
                raise _Retry(cause) from err
            if cause is err:
                raise
            raise cause from err
        finally:
            # Whatever was not read to the end: its stream may be mid-reply.
            if c is not None:
                c.close()
            for b in busy:
                b[0].close()

    def _read_meta(self, *, required: bool) -> _Meta | None:
        key = f"{self._prefix}meta"
        try:
            raw = self._client().get(key)
        except Exception as err:
            raise SourceError(f"RedisSource {self._desc}: reading {key!r} failed: "
                              f"{type(err).__name__}: {err}", source=self._desc) from err
        if raw is None:
            if required:
                raise SourceError(
                    f"RedisSource {self._desc}: no {key!r} key, so the size is unknown; pass "
                    "size= or store the data with userfault.sources.redis.upload()",
                    source=self._desc)
            return None
        try:
            return _parse_meta(raw)
        except ValueError as err:
            raise SourceError(f"RedisSource {self._desc}: {key!r} is not valid meta JSON "
                              f"({raw[:200]!r}): {err}", source=self._desc) from err

    def _replaced(self) -> str | None:
        """Why the pinned generation is no longer the object's, or ``None`` while it is.
        (Called when a page key is missing, and before writes: the meta key says.)"""
        try:
            raw = self._client().get(f"{self._prefix}meta")
            now = None if raw is None else _parse_meta(raw)["generation"]
        except Exception:  # unreadable now: the caller's own error says enough
            return None
        if raw is not None and now == self._generation:
            return None
        if raw is None and self._generation is None:
            return None  # unversioned data without a meta key: nothing to compare
        if raw is None:
            return (f"the object was deleted (generation {self._generation} when this source "
                    f"opened it; its {self._prefix}meta key is gone)")
        was = self._generation or "none (unversioned layout)"
        return (f"the object was uploaded again (generation {was} when this source opened it, "
                f"{now or 'none'} now): its pages are gone and pages of two uploads must never "
                "be mixed; open it again to page the new version")


# redis-py prefixes an error in a pipeline with the command, page bytes and all.
_PIPELINE_NOTE = re.compile(r"Command # \d+ \(.*\) of pipeline caused error: ", re.S)


def _span(views: Sequence[tuple[int, memoryview]]) -> tuple[int, int]:
    """``(offset, length)`` of a batch of reads for its error: from the first request's
    offset to the furthest end."""
    off = views[0][0] if views else 0
    return off, max((o + len(b) for o, b in views), default=off) - off


class RedisPyError(Exception):
    """What redis-py raised on a call made by :func:`_off_stack` (its description)."""


def _off_stack(call: Callable[[], Any]) -> Any:
    """``call()`` (redis-py's cluster client) on a thread of its own, with the reads' frames
    out of its reach. redis-py keeps the exceptions of a cluster pipeline (an ASK it
    followed, in its command objects), and their tracebacks reach every frame below the
    call, with the caller's buffers in them: a pager would see a buffer still referenced after
    the read and fail it. What it raises comes back as a :class:`RedisPyError` naming it."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = call()
        except Exception as err:  # described, never raised on the caller's stack
            box["error"] = _describe_error(err)

    t = threading.Thread(target=run, name="uf-redis-py", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise RedisPyError(box["error"])
    return box["value"]


def _forget_frames(err: BaseException) -> None:
    """Drop the frames a caught exception (and its causes) still holds, clearing the locals
    of those that are done. They hold views of the caller's buffers, and the exception chain
    is a reference cycle (a cause kept in a frame of its own traceback), freed only by a
    later garbage collection: a pager would see the buffer still referenced after the read
    and fail it."""
    todo: list[BaseException | None] = [err]
    seen: set[int] = set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        traceback.clear_frames(e.__traceback__)
        e.__traceback__ = None  # the frames still running (the caller's) too
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]


def _describe_error(err: BaseException) -> str:
    if isinstance(err, RedisPyError):
        return str(err)  # described already
    slot, host = getattr(err, "slot_id", None), getattr(err, "host", None)
    if slot is not None and host is not None:  # redis-py's MovedError and AskError
        port = getattr(err, "port", "?")
        return f"{type(err).__name__}: hash slot {slot} is served by {host}:{port} now"
    return f"{type(err).__name__}: {_PIPELINE_NOTE.sub('', str(err))}"


def _store(client: Any, cluster: bool, url: str, replicas: int, wait_ms: int,
           full: list[tuple[str, bytes]], partial: list[tuple[str, int, bytes]]
           ) -> list[tuple[str, int]]:
    """SET and SETRANGE the keys, one pipeline per server; with ``replicas``, each ends in
    ``WAIT replicas wait_ms``. Returns ``[(node, acknowledgements)]`` of the masters whose
    replicas fell short."""
    if not cluster:
        return _store_on(client, _server_of(url), replicas, wait_ms, full, partial)
    # Not redis-py's cluster pipeline: it picks connections of its own and follows
    # redirections on others, so a WAIT in it could vouch for nothing (WAIT counts the
    # writes of its own connection), and it costs more per call (bench_redis_writeback).
    per_node: dict[str, tuple[Any, list[tuple[str, bytes]], list[tuple[str, int, bytes]]]]
    per_node = {}
    for k, v in full:
        node = client.get_node_from_key(k)
        per_node.setdefault(node.name, (node, [], []))[1].append((k, v))
    for k, at, v in partial:
        node = client.get_node_from_key(k)
        per_node.setdefault(node.name, (node, [], []))[2].append((k, at, v))
    short = []

    def target(host: str, port: int) -> Any:  # the node an ASK names
        return client.get_redis_connection(client.get_node(host, port))

    try:
        for name, (node, node_full, node_partial) in per_node.items():
            short += _store_on(client.get_redis_connection(node), name, replicas, wait_ms,
                               node_full, node_partial, asked=target)
    except Exception:
        # A stale slot map (MOVED, ASK) or a master gone: a retry asks the cluster again
        # where the keys live.
        with contextlib.suppress(Exception):
            client.nodes_manager.initialize()
        raise
    return short


def _store_on(server: Any, name: str, replicas: int, wait_ms: int,
              full: list[tuple[str, bytes]], partial: list[tuple[str, int, bytes]],
              asked: Callable[[str, int], Any] | None = None, asking: bool = False
              ) -> list[tuple[str, int]]:
    """One pipeline to one server: the writes, then WAIT on the same connection. With
    ``asked`` (a cluster), the writes a slot being migrated sends on (ASK) are made on the
    node it names, each after ASKING, with their own WAIT there."""
    pipe = server.pipeline(transaction=False)
    _queue(pipe, full, partial, asking=asking)
    if replicas:
        pipe.execute_command("WAIT", replicas, wait_ms)
    if asked is None:
        results = pipe.execute()
        return [] if not replicas or int(results[-1]) >= replicas else [(name, int(results[-1]))]
    results = pipe.execute(raise_on_error=False)
    writes = results[1::2] if asking else results[:len(full) + len(partial)]
    errors = _import_redis().exceptions
    asks: dict[tuple[str, int], tuple[list[tuple[str, bytes]], list[tuple[str, int, bytes]]]] = {}
    for i, res in enumerate(writes):
        if isinstance(res, errors.AskError) and not isinstance(res, errors.MovedError):
            dest = asks.setdefault(res.node_addr, ([], []))  # (MovedError is an AskError)
            if i < len(full):
                dest[0].append(full[i])
            else:
                dest[1].append(partial[i - len(full)])
        elif isinstance(res, Exception):
            raise res  # MOVED among them: _store refreshes the slot map, the caller retries
    short = []
    if replicas:
        if isinstance(results[-1], Exception):
            raise results[-1]
        if int(results[-1]) < replicas:
            short.append((name, int(results[-1])))
    for (host, port), (node_full, node_partial) in asks.items():
        short += _store_on(asked(host, port), f"{host}:{port}", replicas, wait_ms, node_full,
                           node_partial, asking=True)  # its redirections, if any, raise
    return short


def _wait_ms(wait_timeout: float) -> int:
    return max(1, round(wait_timeout * 1000))  # WAIT 0 would wait forever


def _fell_short(short: list[tuple[str, int]], replicas: int, wait_timeout: float) -> str:
    """What ``_store`` returned, said: ``WAIT n ms: only k of n replica(s) of node ...``."""
    nodes = "; ".join(f"only {acked} of {replicas} replica(s) of {node} acknowledged it"
                      for node, acked in short)
    return f"WAIT {replicas} {_wait_ms(wait_timeout)}: {nodes} within {wait_timeout:g} s"


def _queue(pipe: Any, full: list[tuple[str, bytes]], partial: list[tuple[str, int, bytes]],
           *, asking: bool = False) -> None:
    """The SETs, then the SETRANGEs; with ``asking`` each after an ASKING (it lets one
    command into a slot the node is importing)."""
    for k, v in full:
        if asking:
            pipe.execute_command("ASKING")
        pipe.set(k, v)
    for k, at, v in partial:
        if asking:
            pipe.execute_command("ASKING")
        pipe.setrange(k, at, v)


def _server_of(url: str) -> str:
    """``host:port`` of a redis URL (for messages)."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.hostname}:{parts.port or 6379}" if parts.hostname else _describe_url(url)


def _wait_options(replicas: int | None, wait_timeout: float | None, cluster: bool,
                  timeout: float) -> tuple[int, float]:
    """``(replicas, wait_timeout)`` with their defaults, checked."""
    if replicas is None:
        replicas = 1 if cluster else 0
    if wait_timeout is None:
        wait_timeout = min(1.0, timeout / 2)
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
        raise ValueError(f"replicas must be an int >= 0 (how many replicas must acknowledge a "
                         f"write; 0: do not wait), not {replicas!r}")
    if (isinstance(wait_timeout, bool) or not isinstance(wait_timeout, (int, float))
            or not wait_timeout > 0 or (replicas and wait_timeout >= timeout)):
        raise ValueError(f"wait_timeout must be a number of seconds > 0 and less than "
                         f"timeout={timeout:g} (the socket timeout must outlast WAIT), not "
                         f"{wait_timeout!r}")
    return replicas, float(wait_timeout)


class _Meta(TypedDict):
    size: int
    page_size: int
    generation: str | None  # None: the unversioned layout (meta version 1)


def _parse_meta(raw: bytes) -> _Meta:
    """The meta key's JSON (version 1 or 2); ``ValueError`` if it is not valid."""
    try:
        meta = json.loads(raw)
        out: _Meta = {"size": int(meta["size"]), "page_size": int(meta["page_size"]),
                      "generation": None}
        version = int(meta.get("version", 1))
        if version >= 2:
            gen = meta["generation"]
            if not isinstance(gen, str) or not gen.isalnum():
                raise ValueError(f"generation {gen!r} is not alphanumeric")
            out["generation"] = gen
    except (KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{type(err).__name__}: {err}") from err
    _check_page_size(out["page_size"])
    if out["size"] < 0:
        raise ValueError(f"negative size {out['size']}")
    return out


def _bytes_view(buf: memoryview) -> memoryview:
    mv = memoryview(buf)
    if mv.readonly:
        raise TypeError("read_into needs a writable buffer")
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv


def _chunks(src: BufferLike | str | os.PathLike[str], chunk: int) -> Iterable[tuple[int, bytes]]:
    if isinstance(src, (str, os.PathLike)):
        with os.fdopen(open_regular(os.fsdecode(src)), "rb") as f:
            pos = 0
            while True:
                data = f.read(chunk)
                if not data:
                    return
                yield pos, data
                pos += len(data)
    else:
        mv = memoryview(src).cast("B")
        for pos in range(0, len(mv), chunk):
            yield pos, bytes(mv[pos: pos + chunk])


def upload(
    source_bytes_or_path: BufferLike | str | os.PathLike[str],
    url: str = "redis://127.0.0.1:6379/0",
    prefix: str = "userfault:",
    page_size: int = 4096,
    skip_zero: bool | Literal["omit"] = True,
    progress: Callable[[int, int], None] | None = None,
    *,
    cluster: bool = False,
    batch_bytes: int = 4 << 20,
    timeout: float = 30.0,
    replicas: int | None = None,
    wait_timeout: float | None = None,
) -> RedisSource:
    """Store a file or buffer in Redis as a new generation of the object at ``prefix``.

    Pages are written with pipelined ``SET`` in batches of about ``batch_bytes`` under keys of
    a new generation; then the meta key is swapped to it in one ``SET ... GET`` (Redis 6.2+),
    so a reader never sees a size before the data is there; then the previous generation's
    keys are deleted. Sources pinned to the previous generation then fail clearly instead of
    mixing two uploads (see the module docstring). A failed upload deletes what it wrote.

    Args:
        skip_zero: ``True`` stores an all-zero page as an empty value (a few dozen bytes instead
            of a page; readers with the default ``missing="error"`` still work). ``"omit"``
            writes no key at all for zero pages: readers then need ``missing="zero"``.
            ``False`` stores every page as is.
        progress: called as ``progress(bytes_done, bytes_total)`` after each batch.
        replicas: the returned source's ``replicas`` (``None``: 1 on a cluster, else 0),
            and, when given, how many replicas of each master must acknowledge every batch
            (``WAIT``) before the meta key is swapped to the new generation, and the swap
            itself. Too few acknowledgements of a batch fail the upload (its keys are
            deleted, the previous generation stays current), where a failover could
            otherwise lose pages behind a meta key that survived; of the swap, it fails
            saying the generation is published on the master (the previous one is kept).
            ``None`` uploads without waiting (a cluster may have no replicas at all).
        wait_timeout: seconds each ``WAIT`` waits, and the returned source's (default
            ``min(1, timeout / 2)``; less than ``timeout``).

    Returns:
        a :class:`RedisSource` on the uploaded data (``missing="zero"`` if ``skip_zero="omit"``).
    """
    _check_page_size(page_size)
    wait_for = replicas or 0  # only when asked: the default suits write-back, not every cluster
    replicas, wait_timeout = _wait_options(replicas, wait_timeout, cluster, timeout)
    wait_ms = _wait_ms(wait_timeout)
    if isinstance(source_bytes_or_path, (str, os.PathLike)):
        total = Path(source_bytes_or_path).stat().st_size
    else:
        total = memoryview(source_bytes_or_path).nbytes
    desc = f"{_describe_url(url)} prefix {prefix!r}"
    generation = secrets.token_hex(8)
    keys = f"{prefix}{generation}:"
    per_batch = max(page_size, batch_bytes // page_size * page_size)
    zero = bytes(page_size)
    done = 0
    try:
        client = _make_client(url, cluster, timeout)
        try:
            try:
                for pos, data in _chunks(source_bytes_or_path, per_batch):
                    pages: list[tuple[str, bytes]] = []
                    for s in range(0, len(data), page_size):
                        page = data[s: s + page_size]
                        if skip_zero and page == zero[: len(page)]:
                            if skip_zero == "omit":
                                continue  # the generation's key space is fresh: no stale key
                            page = b""
                        pages.append((f"{keys}{(pos + s) // page_size}", page))
                    short = _upload_batch(client, cluster, url, wait_for, wait_ms, pages)
                    if short:
                        raise SourceError(
                            f"upload to Redis {desc} failed after {done} of {total} bytes: "
                            f"{_fell_short(short, wait_for, wait_timeout)}; nothing was "
                            "published (the previous generation stays current): a replica "
                            "down or lagging? INFO replication on that master says; leave "
                            "replicas= out to upload without waiting", source=desc, offset=done,
                            length=total - done)
                    done += len(data)
                    if progress is not None:
                        progress(done, total)
                meta = json.dumps({"size": total, "page_size": page_size, "version": 2,
                                   "generation": generation})
                old, acked = _publish(client, cluster, f"{prefix}meta", meta, wait_for, wait_ms)
            except BaseException:
                with contextlib.suppress(Exception):  # the server may be the failure
                    _delete_pages(client, keys, -(-min(total, done + per_batch) // page_size))
                raise
            if acked < wait_for:
                # published on the master: its pages stay, and so do the previous ones, which
                # a replica promoted now (it may still hold the old meta key) would read
                short_meta = _fell_short([(f"the master of {prefix}meta", acked)], wait_for,
                                         wait_timeout)
                raise SourceError(
                    f"upload to Redis {desc}: the new generation is published on the master, "
                    f"but {short_meta}; the previous generation was kept for a replica that "
                    "may still name it: upload again once the replicas are back",
                    source=desc, offset=0, length=total)
            if old is not None:
                _delete_previous(client, prefix, old, desc, generation)
        finally:
            client.close()
    except SourceError:
        raise
    except Exception as err:
        raise SourceError(f"upload to Redis {desc} failed after {done} of {total} bytes: "
                          f"{type(err).__name__}: {err}", source=desc, offset=done,
                          length=total - done) from err
    return RedisSource(url, prefix=prefix, page_size=page_size, size=total, cluster=cluster,
                       missing="zero" if skip_zero == "omit" else "error", timeout=timeout,
                       replicas=replicas, wait_timeout=wait_timeout)


#: MOVED, ASK and TRYAGAIN while a slot of an upload with WAIT moves: attempts, seconds apart
_RESHARD_TRIES, _RESHARD_PAUSE = 8, 0.25


def _upload_batch(client: Any, cluster: bool, url: str, replicas: int, wait_ms: int,
                  pages: list[tuple[str, bytes]]) -> list[tuple[str, int]]:
    """SET one batch of an upload; with ``replicas``, each master's pipeline ends in WAIT
    (``_store``). Returns the masters whose replicas fell short."""
    if not replicas:
        pipe = client.pipeline(transaction=False)  # a cluster's follows MOVED and ASK itself
        for k, v in pages:
            pipe.set(k, v)
        pipe.execute()
        return []
    errors = _import_redis().exceptions
    for attempt in range(_RESHARD_TRIES):
        try:
            return _store(client, cluster, url, replicas, wait_ms, pages, [])
        except (errors.MovedError, errors.AskError, errors.TryAgainError):
            # a slot moved (_store refreshed the slot map: the next attempt goes to its new
            # master; a slot being migrated is followed inside _store, ASKING); SET is
            # idempotent
            if attempt == _RESHARD_TRIES - 1:
                raise
            time.sleep(_RESHARD_PAUSE)
    raise AssertionError("unreachable")


def _publish(client: Any, cluster: bool, key: str, value: str, replicas: int,
             wait_ms: int) -> tuple[bytes | None, int]:
    """``SET key value GET``, then (with ``replicas``) WAIT on the same connection:
    ``(the previous value, acknowledgements)``."""
    if not replicas:
        return client.set(key, value, get=True), 0
    server = client.get_redis_connection(client.get_node_from_key(key)) if cluster else client
    pipe = server.pipeline(transaction=False)
    pipe.set(key, value, get=True)
    pipe.execute_command("WAIT", replicas, wait_ms)
    old, acked = pipe.execute()
    return old, int(acked)


def _delete_pages(client: Any, keys: str, count: int) -> None:
    """Delete the page keys ``{keys}0`` .. ``{keys}{count - 1}`` (UNLINK, pipelined)."""
    for start in range(0, count, 4096):
        pipe = client.pipeline(transaction=False)
        for i in range(start, min(count, start + 4096)):
            pipe.unlink(f"{keys}{i}")
        pipe.execute()


def _delete_previous(client: Any, prefix: str, old: bytes, desc: str, generation: str) -> None:
    """Delete the pages of the generation the meta key named before ``upload`` swapped it."""
    try:
        meta = _parse_meta(old)
    except ValueError:
        return  # not a meta key this module wrote: its pages (if any) cannot be found
    keys = f"{prefix}{meta['generation']}:" if meta["generation"] else prefix
    try:
        _delete_pages(client, keys, -(-meta["size"] // meta["page_size"]))
    except Exception as err:
        raise SourceError(
            f"upload to Redis {desc}: generation {generation} is in place, but deleting the "
            f"previous one ({keys}*) failed: {type(err).__name__}: {err}; delete those keys "
            "to free their memory", source=desc) from err


def _lean_target(url: str) -> tuple[str, int, int, str | None, str | None] | None:
    """(host, port, db, username, password) of a plain ``redis://host[:port][/db]`` URL, or
    ``None`` when redis-py should handle it (TLS, Unix sockets, query options)."""
    try:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "redis" or parts.query or not parts.hostname:
            return None
        path = parts.path.strip("/")
        db = int(path) if path else 0
        user = urllib.parse.unquote(parts.username) if parts.username else None
        password = urllib.parse.unquote(parts.password) if parts.password else None
        return parts.hostname, parts.port or 6379, db, user, password
    except ValueError:
        return None


#: One server's share of a lean read: (host, port), the positions of its keys in the batch,
#: the keys of each of its pipelined MGETs, and the request.
_Pipeline = tuple[tuple[str, int], list[int], list[int], bytes]


def _command(*args: bytes) -> bytes:
    """One command in RESP."""
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def _mget_request(keys: list[bytes], sizes: list[int]) -> bytes:
    """Pipelined MGETs of ``keys``, ``sizes`` keys each."""
    out = []
    s = 0
    for count in sizes:
        out.append(_command(b"MGET", *keys[s: s + count]))
        s += count
    return b"".join(out)


class _RespClosed(ConnectionError):
    """The server closed the connection (before or in the middle of a reply)."""


# A connection that broke under a read: the server closed it, or reset it.
_CLOSED = (_RespClosed, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)
# Error replies of a cluster whose slot map changed (or is changing) under a read.
_REDIRECTED = ("MOVED ", "ASK ", "TRYAGAIN", "CLUSTERDOWN")


def _migrating(err: BaseException) -> bool:
    """A cluster's reply for a slot being moved: the keys asked for are on their way."""
    return isinstance(err, RedisErrorReply) and str(err).startswith(("ASK ", "TRYAGAIN"))


class _Retry(Exception):
    """A lean read failed in a way that trying once more (on a fresh connection, after
    refreshing the slot map) may cure; ``cause`` is the error to raise if it does not."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class RedisErrorReply(Exception):
    """An error reply (``-ERR ...``) from the server."""


class RespProtocolError(Exception):
    """A reply that is not RESP2 as this reader expects it (wrong count, kind or length)."""


class _TooLong(Exception):
    """MGET element ``index`` holds ``length`` bytes, more than a page: the value is not read
    (a lying length could be anything) and the connection is dropped."""

    def __init__(self, index: int, length: int, left: list[tuple[int, bytes | int | None]]
                 ) -> None:
        super().__init__(f"element {index} holds {length} bytes")
        self.index, self.length, self.left = index, length, left


def _int(line: bytes, what: str) -> int:
    try:
        return int(line)
    except ValueError:
        raise RespProtocolError(f"unexpected {what} {line[:80]!r}") from None


class _RespConn:
    """One raw RESP2 connection (TCP_NODELAY), authenticated and on the right database.

    Replies are received into a fixed buffer (``buf[pos:end]`` not yet parsed); MGET values go
    from there, or for the part not yet received straight from the socket, into the caller's
    destination buffers."""

    __slots__ = ("buf", "deadline", "end", "pos", "sock", "view")

    BUFSIZE = 1 << 18

    def __init__(self, host: str, port: int, db: int, user: str | None, password: str | None,
                 timeout: float) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = bytearray(self.BUFSIZE)
        self.view = memoryview(self.buf)
        self.pos = 0
        self.end = 0
        self.deadline = time.monotonic() + timeout  # replies must be complete by then
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            setup = []
            if password is not None:
                setup.append([b"AUTH", *([user.encode()] if user else []), password.encode()])
            if db:
                setup.append([b"SELECT", b"%d" % db])
            if setup:
                self.sock.sendall(b"".join(_command(*cmd) for cmd in setup))
                for _ in setup:
                    self.line()  # +OK, or an error reply raised
        except BaseException:
            self.sock.close()
            raise

    def close(self) -> None:
        self.sock.close()

    def _fill(self) -> None:
        """Receive more bytes after ``buf[pos:end]`` (moved to the front when needed)."""
        pos, end = self.pos, self.end
        if pos == end:
            self.pos = self.end = pos = end = 0
        elif end == len(self.buf) or len(self.buf) - end < 4096:
            if pos == 0:  # a reply line longer than the buffer
                self.view.release()
                self.buf.extend(bytes(len(self.buf)))
                self.view = memoryview(self.buf)
            else:
                self.view[: end - pos] = self.view[pos: end]
                self.pos, self.end = 0, end - pos
                end = end - pos
        got = self.sock.recv_into(self.view[end:])
        if not got:
            raise _RespClosed("the server closed the connection")
        self.end = end + got
        self._check_deadline()

    def _check_deadline(self) -> None:
        # The socket timeout bounds the wait for each byte only: a server trickling bytes
        # must not hold a fault forever.
        if time.monotonic() > self.deadline:
            raise TimeoutError("the server sent its reply too slowly")

    def _recv_exact(self, dst: memoryview) -> None:
        """Fill ``dst`` from the socket (the buffer is empty)."""
        got = 0
        n = len(dst)
        while got < n:
            k = self.sock.recv_into(dst[got:])
            if not k:
                raise _RespClosed("the server closed the connection")
            got += k
            if got < n:
                self._check_deadline()

    def line(self) -> bytes:
        """The next reply line (an error reply is raised)."""
        while True:
            end = self.buf.find(b"\r\n", self.pos, self.end)
            if end >= 0:
                out = bytes(self.view[self.pos: end])
                self.pos = end + 2
                if out[:1] == b"-":
                    raise RedisErrorReply(out[1:].decode("utf-8", "replace"))
                return out
            self._fill()

    def _crlf(self) -> None:
        while self.end - self.pos < 2:
            self._fill()
        self.pos += 2

    def _value(self, n: int, dst: memoryview) -> None:
        """Copy the next ``n`` = ``len(dst)`` value bytes (and skip the CRLF after them)."""
        avail = self.end - self.pos
        if avail >= n:
            dst[:] = self.view[self.pos: self.pos + n]
            self.pos += n
        else:
            dst[:avail] = self.view[self.pos: self.end]
            self.pos = self.end = 0
            self._recv_exact(dst[avail:])  # the rest skips the buffer
        self._crlf()

    def read_bulks(self, sizes: list[int], dsts: list[memoryview | None],
                   zero: bytes) -> list[tuple[int, bytes | int | None]]:
        """The replies of ``sum(sizes)`` pipelined commands that each answer one bulk string
        (GETRANGE), as ``[(index, value)]``; none may be longer than a page (``zero``).
        (``dsts``: unused, as :meth:`read_mget_into` takes it.)"""
        out: list[tuple[int, bytes | int | None]] = []
        for k in range(sum(sizes)):
            head = self.line()
            if head[:1] != b"$":
                raise RespProtocolError(f"unexpected reply {head[:80]!r} to GETRANGE")
            n = _int(head[1:], "bulk length")
            if n > len(zero) or n < -1:
                raise RespProtocolError(f"unexpected bulk length {n} in a GETRANGE reply")
            if n < 0:
                out.append((k, None))
                continue
            val = bytearray(n)
            self._value(n, memoryview(val))
            out.append((k, bytes(val)))
        return out

    def read_mget_into(self, sizes: list[int], dsts: list[memoryview | None],
                       zero: bytes) -> list[tuple[int, bytes | int | None]]:
        """The replies of pipelined MGETs of ``sizes`` keys each: a value no longer than its
        ``dsts`` entry is written there (the rest of it zeroed); the others are returned as
        ``[(index into dsts, value or None for a missing key)]``. A value longer than a page
        raises :class:`_TooLong` with the entries read so far."""
        left: list[tuple[int, bytes | int | None]] = []
        buf = self.buf
        ps = len(zero)
        full = b"$%d\r\n" % ps  # the header of a whole page
        hl = len(full)
        need = hl + ps + 2
        base = 0
        for count in sizes:
            head = self.line()
            if head[:1] != b"*" or _int(head[1:], "reply to MGET") != count:
                raise RespProtocolError(f"unexpected reply {head[:80]!r} to MGET of {count} "
                                        "keys")
            view, pos, end = self.view, self.pos, self.end
            for k in range(base, base + count):
                dst = dsts[k]
                # The common case inline: a whole page into a whole-page destination, already
                # received.
                if (dst is not None and end - pos >= need and len(dst) == ps
                        and buf.startswith(full, pos)):
                    dst[:] = view[pos + hl: pos + hl + ps]
                    pos += need
                    continue
                self.pos = pos
                # The bulk string header.
                nl = buf.find(b"\r\n", pos, end)
                if nl < 0 or buf[pos] != 36:  # b"$"
                    item = self.line()
                    if item[:1] != b"$":
                        raise RespProtocolError(f"unexpected element {item[:80]!r} in an MGET "
                                                "reply")
                    n = _int(item[1:], "bulk length")
                else:
                    n = _int(bytes(buf[pos + 1: nl]), "bulk length")
                    self.pos = nl + 2
                if n > ps:
                    raise _TooLong(k, n, left)
                if n < 0:
                    if n != -1:
                        raise RespProtocolError(f"unexpected bulk length {n}")
                    left.append((k, None))
                elif dst is not None and n <= len(dst):
                    if n < len(dst):
                        dst[n:] = zero[: len(dst) - n]
                    self._value(n, dst[:n])
                else:
                    val = bytearray(n)
                    self._value(n, memoryview(val))
                    left.append((k, bytes(val)))
                view, pos, end = self.view, self.pos, self.end
            self.pos = pos
            base += count
        return left
