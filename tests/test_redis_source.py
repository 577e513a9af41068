"""RedisSource against a real redis-server and a real 3-master Redis Cluster."""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import pickle
import random
from pathlib import Path

import pytest
import redis
import redis.cluster
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import userfault
from pager_helpers import run_script
from server_fixtures import FreshServers, require_servers
from servers import RedisCluster, RedisServer, paused
from userfault.errors import PrefetchError, SourceError
from userfault.sources.base import BatchedPageSource, WritablePageSource
from userfault.sources.redis import RedisSource, upload

PAGE = 4096
SIZE = 300 * PAGE + 1234
_prefixes = itertools.count()


def make_data(seed: int = 99, size: int = SIZE) -> bytes:
    data = bytearray(random.Random(seed).randbytes(size))
    data[10 * PAGE: 14 * PAGE] = bytes(4 * PAGE)  # zero pages, stored as empty values
    return bytes(data)


def new_prefix() -> str:
    return f"t{next(_prefixes)}:"


def expected(data: bytes, offset: int, length: int) -> bytes:
    chunk = data[offset: offset + length]
    return chunk + bytes(length - len(chunk))


def read(src: RedisSource, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    src.read_into(offset, memoryview(buf))
    return bytes(buf)


@pytest.fixture(scope="module", params=[4096, 16384], ids=["page4k", "page16k"])
def stored(request: pytest.FixtureRequest,
           redis_server: RedisServer) -> tuple[RedisSource, bytes]:
    data = make_data()
    src = upload(data, redis_server.url, prefix=new_prefix(), page_size=request.param)
    return src, data


def test_upload_layout_and_meta(redis_server: RedisServer) -> None:
    data = make_data()
    prefix = new_prefix()
    progress: list[tuple[int, int]] = []
    src = upload(data, redis_server.url, prefix, 4096,
                 progress=lambda d, t: progress.append((d, t)), batch_bytes=256 * 1024)
    assert isinstance(src, BatchedPageSource) and isinstance(src, WritablePageSource)
    assert progress[-1] == (SIZE, SIZE) and len(progress) == -(-SIZE // (256 * 1024))
    r = redis.Redis.from_url(redis_server.url)
    gen = src.generation
    assert gen is not None and len(gen) == 16
    assert json.loads(r.get(f"{prefix}meta")) == {"size": SIZE, "page_size": 4096, "version": 2,
                                                   "generation": gen}
    assert src.key(0) == f"{prefix}{gen}:0"
    assert r.get(f"{prefix}{gen}:0") == data[:PAGE]
    assert r.get(f"{prefix}{gen}:11") == b""  # zero page -> empty value
    assert r.strlen(f"{prefix}{gen}:300") == 1234  # the short last page
    assert r.exists(f"{prefix}{gen}:301") == 0
    assert sorted(r.keys(f"{prefix}*")) == sorted(
        [f"{prefix}meta".encode()] + [f"{prefix}{gen}:{i}".encode() for i in range(301)])
    learned = RedisSource(redis_server.url, prefix=prefix)
    assert (learned.size, learned.page_size, learned.generation) == (SIZE, 4096, gen)
    r.close()


def test_sequential_pages(stored: tuple[RedisSource, bytes]) -> None:
    src, data = stored
    for off in range(0, SIZE, PAGE):
        assert read(src, off, PAGE) == expected(data, off, PAGE)


@settings(max_examples=50, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(offset=st.integers(0, SIZE - 1), length=st.integers(1, 100_000))
def test_random_ranges(stored: tuple[RedisSource, bytes], offset: int, length: int) -> None:
    src, data = stored
    assert read(src, offset, length) == expected(data, offset, length)


def test_read_many(stored: tuple[RedisSource, bytes]) -> None:
    src, data = stored
    rng = random.Random(5)
    reqs = [(rng.randrange(SIZE), rng.choice([PAGE, 3 * PAGE, 100, 70_000])) for _ in range(300)]
    bufs = [bytearray(n) for _, n in reqs]
    src.read_many([(off, memoryview(b)) for (off, _), b in zip(reqs, bufs, strict=True)])
    for (off, n), b in zip(reqs, bufs, strict=True):
        assert bytes(b) == expected(data, off, n)


def _calls(r: redis.Redis, command: str) -> int:
    return int(r.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))


def test_small_parts_of_pages_are_read_with_getrange(redis_server: RedisServer) -> None:
    """Rows of 64 KiB pages (a working set's scattered runs) come as GETRANGE of the part, not
    MGET of each whole value; a part that comes back short is left to the MGET, which still
    tells a zero page (an empty value) from a missing key."""
    page = 64 << 10
    data = make_data(size=8 * page + 1000)
    data = data[:3 * page] + bytes(page) + data[4 * page:]  # page 3 is zeros (an empty value)
    prefix = new_prefix()
    src = upload(data, redis_server.url, prefix, page_size=page)
    r = redis.Redis.from_url(redis_server.url)
    rows = [(p * page + k * 4096 + 7, 4096) for p in (0, 2, 3, 5) for k in (1, 9)]
    rows += [(8 * page + 100, 800)]  # inside the last, short page
    bufs = [bytearray(n) for _, n in rows]
    before = _calls(r, "getrange"), _calls(r, "mget")
    src.read_many([(o, memoryview(b)) for (o, _), b in zip(rows, bufs, strict=True)])
    assert [bytes(b) for b in bufs] == [expected(data, o, n) for o, n in rows]
    assert _calls(r, "getrange") - before[0] == 9  # one per row
    assert _calls(r, "mget") - before[1] == 1  # page 3's empty value: its MGET says zeros
    r.delete(src.key(5))
    with pytest.raises(SourceError, match=rf"page key '{src.key(5)}' does not exist"):
        src.read_many([(5 * page + 4096, memoryview(bytearray(4096)))])
    r.close()


def test_big_read_many_pipelines_mget_batches(redis_server: RedisServer) -> None:
    data = random.Random(3).randbytes(4 << 20)
    src = upload(data, redis_server.url, prefix=new_prefix())
    buf = bytearray(len(data))
    mv = memoryview(buf)
    src.read_many([(o, mv[o: o + (1 << 20)]) for o in range(0, len(data), 1 << 20)])
    assert hashlib.sha256(buf).digest() == hashlib.sha256(data).digest()


def test_missing_key_is_an_error_unless_opted_in(redis_server: RedisServer) -> None:
    data = make_data()
    prefix = new_prefix()
    up = upload(data, redis_server.url, prefix)
    r = redis.Redis.from_url(redis_server.url)
    r.delete(up.key(5))
    src = RedisSource(redis_server.url, prefix=prefix)
    with pytest.raises(SourceError, match=rf"\[16384, 28672\).*page key '{up.key(5)}' does not "
                                          r"exist \(never uploaded") as info:
        src.read_into(4 * PAGE, memoryview(bytearray(3 * PAGE)))
    assert (info.value.offset, info.value.length) == (4 * PAGE, 3 * PAGE)
    with pytest.raises(SourceError, match="does not exist"):
        src.read_many([(0, memoryview(bytearray(PAGE))), (5 * PAGE, memoryview(bytearray(PAGE)))])
    sparse = RedisSource(redis_server.url, prefix=prefix, missing="zero")
    assert read(sparse, 4 * PAGE, 3 * PAGE) == data[4 * PAGE: 5 * PAGE] + bytes(PAGE) + data[
        6 * PAGE: 7 * PAGE]
    r.close()


def test_skip_zero_omit_needs_missing_zero(redis_server: RedisServer) -> None:
    data = make_data()
    prefix = new_prefix()
    src = upload(data, redis_server.url, prefix, skip_zero="omit")
    r = redis.Redis.from_url(redis_server.url)
    assert r.exists(src.key(11)) == 0 and r.exists(src.key(9)) == 1
    assert read(src, 0, SIZE) == data
    with pytest.raises(SourceError, match="does not exist"):
        RedisSource(redis_server.url, prefix=prefix).read_into(10 * PAGE,
                                                              memoryview(bytearray(PAGE)))
    r.close()


def test_meta_errors(redis_server: RedisServer) -> None:
    prefix = new_prefix()
    with pytest.raises(SourceError, match=rf"no '{prefix}meta' key, so the size is unknown"):
        RedisSource(redis_server.url, prefix=prefix)
    upload(b"x" * 3 * 16384, redis_server.url, prefix, page_size=16384)
    with pytest.raises(SourceError, match=r"page_size=4096 was asked for but .* page_size 16384"):
        RedisSource(redis_server.url, prefix=prefix, page_size=4096)
    with pytest.raises(SourceError, match=r"page_size=4096 was asked for but .* page_size 16384"):
        RedisSource(redis_server.url, prefix=prefix, page_size=4096, size=3 * 16384)
    # A value longer than the page, in the unversioned layout (no meta key): a wrong
    # page_size given with an explicit size.
    raw = new_prefix()
    r = redis.Redis.from_url(redis_server.url)
    r.set(f"{raw}0", b"x" * 16384)
    r.close()
    src = RedisSource(redis_server.url, prefix=raw, page_size=4096, size=3 * 16384)
    assert src.generation is None and src.key(0) == f"{raw}0"
    with pytest.raises(SourceError, match="holds 16384 bytes, more than the page size 4096"):
        src.read_into(0, memoryview(bytearray(PAGE)))
    with pytest.raises(ValueError, match="power of two >= 4096"):
        RedisSource(redis_server.url, prefix=prefix, page_size=6000, size=1)


def test_write_from_whole_and_partial_pages(redis_server: RedisServer) -> None:
    data = bytearray(make_data())
    prefix = new_prefix()
    src = upload(bytes(data), redis_server.url, prefix, page_size=16384)
    writes = [(0, b"A" * 16384), (16384 + 100, b"B" * 5000), (3 * 16384 - 10, b"C" * 40000),
              (20 * 16384, bytes(16384)), (SIZE - 10, b"D" * 4096)]
    for off, payload in writes:
        src.write_from(off, memoryview(payload))
        n = min(len(payload), SIZE - off)  # bytes past the size are dropped
        data[off: off + n] = payload[:n]
    assert read(src, 0, SIZE) == bytes(data)
    fresh = RedisSource(redis_server.url, prefix=prefix)
    assert read(fresh, 0, SIZE) == bytes(data)
    r = redis.Redis.from_url(redis_server.url)
    assert r.get(src.key(20)) == b""  # a zero page written back is an empty value
    r.delete(src.key(7))
    with pytest.raises(SourceError, match=f"partial write to missing page key '{src.key(7)}'"):
        src.write_from(7 * 16384 + 8, memoryview(b"x"))
    with pytest.raises(SourceError, match="outside the source"):
        src.write_from(SIZE, memoryview(b"x"))
    r.close()


def test_redis_killed_raises_source_error(fresh_servers: FreshServers) -> None:
    data = make_data()
    server = fresh_servers.redis()
    src = upload(data, server.url, "k:", timeout=2.0)
    assert read(src, 0, PAGE) == data[:PAGE]
    server.kill()
    buf = bytearray(b"\xaa" * PAGE)
    with pytest.raises(SourceError, match=r"RedisSource redis://127\.0\.0\.1:\d+/0 prefix "
                                          r"'k:': read \[4096, 8192\).*Connection"):
        src.read_into(PAGE, memoryview(buf))
    with pytest.raises(SourceError, match="write"):
        src.write_from(0, memoryview(bytes(PAGE)))
    with pytest.raises(SourceError, match="upload to Redis"):
        upload(data, server.url, "k2:", timeout=2.0)


def _child_read(src: RedisSource, q: multiprocessing.Queue[object]) -> None:
    try:
        buf = bytearray(src.size)
        mv = memoryview(buf)
        src.read_many([(o, mv[o: o + 65536]) for o in range(0, src.size, 65536)])
        src.write_from(0, memoryview(b"child!" + bytes(PAGE - 6)))
        q.put(hashlib.sha256(buf).hexdigest())
    except BaseException as err:
        q.put(repr(err))


def _fork_read(src: RedisSource) -> object:
    ctx = multiprocessing.get_context("fork")
    q: multiprocessing.Queue[object] = ctx.Queue()
    p = ctx.Process(target=_child_read, args=(src, q))
    p.start()
    result = q.get(timeout=30)
    p.join(10)
    return result


def test_pickle_then_read_in_forked_child(redis_server: RedisServer) -> None:
    data = make_data()
    src = upload(data, redis_server.url, new_prefix())
    assert read(src, 0, PAGE) == data[:PAGE]  # the parent's client is connected now
    state = pickle.dumps(src)
    assert b"Connection" not in state and len(state) < 400
    clone = pickle.loads(state)
    digest = hashlib.sha256(data).hexdigest()
    assert _fork_read(src) == digest
    changed = b"child!" + bytes(PAGE - 6) + data[PAGE:]
    assert _fork_read(clone) == hashlib.sha256(changed).hexdigest()
    assert read(src, 0, 6) == b"child!"  # the child's write-back is visible; parent still works


@pytest.fixture(scope="module")
def cluster_data(redis_cluster: RedisCluster) -> tuple[RedisSource, bytes]:
    data = make_data(seed=5, size=2 * 1024 * 1024 + 77)
    src = upload(data, redis_cluster.url, new_prefix(), cluster=True)
    return src, data


def test_cluster_spreads_pages_over_all_masters(redis_cluster: RedisCluster,
                                                cluster_data: tuple[RedisSource, bytes]) -> None:
    for host, port in redis_cluster.startup_nodes:
        node = redis.Redis(host=host, port=port)
        assert node.dbsize() > 50, f"node {port} holds too few pages"
        node.close()


def test_cluster_read_many_and_random_reads(cluster_data: tuple[RedisSource, bytes]) -> None:
    src, data = cluster_data
    size = len(data)
    buf = bytearray(size)
    mv = memoryview(buf)
    src.read_many([(o, mv[o: o + (1 << 20)]) for o in range(0, size, 1 << 20)])
    assert buf == data
    rng = random.Random(11)
    for _ in range(40):
        off, n = rng.randrange(size), rng.randrange(1, 50_000)
        assert read(src, off, n) == expected(data, off, n)


def test_cluster_write_and_fork(redis_cluster: RedisCluster,
                                cluster_data: tuple[RedisSource, bytes]) -> None:
    src, data = cluster_data
    reader = RedisSource(redis_cluster.url, prefix=src.prefix, cluster=True, replicas=0)
    assert reader.size == len(data)
    payload = random.Random(2).randbytes(5 * PAGE + 123)
    reader.write_from(100 * PAGE + 7, memoryview(payload))
    assert read(src, 100 * PAGE + 7, len(payload)) == payload
    before = bytearray(data)
    before[100 * PAGE + 7: 100 * PAGE + 7 + len(payload)] = payload
    # The child reads everything (sees the write), then writes page 0 back.
    assert _fork_read(pickle.loads(pickle.dumps(reader))) == hashlib.sha256(before).hexdigest()
    before[:PAGE] = b"child!" + bytes(PAGE - 6)
    assert read(src, 0, len(data)) == bytes(before)


def test_cluster_small_parts_are_read_with_getrange_from_each_master(
        redis_cluster: RedisCluster) -> None:
    """As on one server: rows of 64 KiB pages come as GETRANGE, one pipeline per master that
    holds some, every part in its place; a zero page's empty value is left to MGET."""
    page = 64 << 10
    data = make_data(seed=8, size=24 * page + 500)
    data = data[:5 * page] + bytes(page) + data[6 * page:]  # page 5 is zeros
    src = upload(data, redis_cluster.url, new_prefix(), page_size=page, cluster=True)
    nodes = [redis.Redis(host=h, port=p) for h, p in redis_cluster.startup_nodes]

    def calls(command: str) -> list[int]:
        return [_calls(n, command) for n in nodes]

    rows = [(p * page + k * 4096 + 3, 4096) for p in range(24) for k in (2, 11)]
    rows += [(24 * page + 10, 300)]  # inside the last, short page
    bufs = [bytearray(n) for _, n in rows]
    before_gr, before_mget = calls("getrange"), calls("mget")
    src.read_many([(o, memoryview(b)) for (o, _), b in zip(rows, bufs, strict=True)])
    assert [bytes(b) for b in bufs] == [expected(data, o, n) for o, n in rows]
    per_node = [a - b for a, b in zip(calls("getrange"), before_gr, strict=True)]
    assert sum(per_node) == len(rows)  # one per row
    assert sum(1 for n in per_node if n) > 1  # the pages' keys spread over the masters
    assert sum(calls("mget")) - sum(before_mget) == 1  # page 5's empty value: zeros
    for n in nodes:
        n.close()


@pytest.mark.parametrize("prefix, page_size", [("pg:", 4096), ("{obj}pg:", 65536)],
                         ids=["spread", "hashtag-64k"])
def test_cluster_pager_serves_every_byte(redis_cluster: RedisCluster, prefix: str,
                                         page_size: int) -> None:
    # Through a pager process (the lean reader: one pipeline per master); a hash tag puts
    # every key in one slot, so its keys must hash by the tag alone.
    data = make_data(seed=21, size=3 * 1024 * 1024 + 999)
    src = upload(data, redis_cluster.url, f"{prefix}{new_prefix()}", page_size=page_size,
                 cluster=True)
    with userfault.map(src) as pager:
        view = memoryview(pager)
        assert hashlib.sha256(view[:len(data)]).digest() == hashlib.sha256(data).digest()
        view.release()


def move_page_slot(cluster: RedisCluster, src: RedisSource, page: int, *,
                   finish: bool = True) -> tuple[int, int]:
    """Move the hash slot of ``src``'s page ``page`` (not the meta key's) to another master;
    returns the ports of its old and new owners."""
    rc = redis.cluster.RedisCluster.from_url(cluster.url, socket_timeout=10)
    slot = rc.keyslot(src.key(page))
    assert rc.keyslot(f"{src.prefix}meta") != slot
    before = rc.get_node_from_key(src.key(page)).port
    rc.close()
    after = next(m.port for m in cluster.primaries() if m.port != before)
    cluster.move_slot(slot, after, finish=finish)
    return before, after


def read_parts(src: RedisSource, parts: list[tuple[int, int]]) -> list[bytes]:
    """One ``read_many`` of small ``(offset, length)`` parts (each read with GETRANGE)."""
    bufs = [bytearray(n) for _, n in parts]
    src.read_many([(o, memoryview(b)) for (o, _), b in zip(parts, bufs, strict=True)])
    return [bytes(b) for b in bufs]


def test_cluster_read_after_its_slot_moved(fresh_servers: FreshServers) -> None:
    cluster = fresh_servers.cluster()  # private: this test reshards it
    data = make_data(seed=23, size=64 * PAGE)
    src = upload(data, cluster.url, new_prefix(), cluster=True)
    assert read(src, 0, len(data)) == data  # the source has the slot map and connections now
    _, after = move_page_slot(cluster, src, 2)
    moved = redis.Redis(port=after)
    assert moved.get(src.key(2)) == data[2 * PAGE: 3 * PAGE]  # the page lives there now
    moved.close()
    # The source's slot map is stale: MOVED from the old owner (to the GETRANGE of small
    # parts, then to the MGET they fall back to), a new map, a retry.
    assert read_parts(src, [(2 * PAGE + 100, 200), (2 * PAGE + 3000, 64)]) == [
        data[2 * PAGE + 100: 2 * PAGE + 300], data[2 * PAGE + 3000: 2 * PAGE + 3064]]
    assert read(src, 0, len(data)) == data


def test_cluster_read_while_its_slot_is_migrating(fresh_servers: FreshServers) -> None:
    cluster = fresh_servers.cluster()  # private: this test leaves a slot half-moved
    data = make_data(seed=29, size=64 * PAGE)
    src = upload(data, cluster.url, new_prefix(), cluster=True)
    assert read(src, 0, len(data)) == data
    before, _ = move_page_slot(cluster, src, 5, finish=False)
    old_owner = redis.Redis(port=before)
    with pytest.raises(redis.exceptions.AskError):
        old_owner.get(src.key(5))  # the page's key has left: its old owner answers ASK
    old_owner.close()
    # The slot map is unchanged (the old owner still owns the slot), so a refresh cannot
    # help: the page is read where ASK points, every byte right (small parts too).
    assert read_parts(src, [(5 * PAGE + 10, 100)]) == [data[5 * PAGE + 10: 5 * PAGE + 110]]
    assert read(src, 0, len(data)) == data
    # Through a pager, one page per fault: redis-py, which follows the ASK, keeps the
    # exceptions of its pipeline, and their tracebacks must not reach the read's buffer (the
    # pager would fail the read: the source kept a reference). In a child: that failure is
    # a SIGBUS.
    result = run_script(f"""
        import hashlib, userfault
        from userfault.sources.redis import RedisSource
        src = RedisSource({cluster.url!r}, prefix={src.prefix!r}, cluster=True)
        with userfault.map(src, readahead=False) as pager:
            print(hashlib.sha256(memoryview(pager)[:{len(data)}]).hexdigest(), flush=True)
    """, timeout=60)
    assert result.stdout.split() == [hashlib.sha256(data).hexdigest()], result.stderr


def test_cluster_node_down_raises(fresh_servers: FreshServers) -> None:
    data = make_data(seed=8, size=64 * PAGE)
    cluster = fresh_servers.cluster()  # a private cluster: this test kills one of its masters
    src = upload(data, cluster.url, "down:", cluster=True, timeout=2.0)
    assert read(src, 0, len(data)) == data
    cluster.nodes[1].kill()
    with pytest.raises(SourceError, match=r"read \[0, 262144\)"):
        read(src, 0, len(data))


@pytest.mark.timeout(90)
def test_a_stopped_master_ends_a_prefetch_at_its_first_timeout(fresh_servers: FreshServers
                                                                ) -> None:
    """A master that keeps its connections and answers nothing (SIGSTOP): the prefetch stops
    at the first read that times out and poisons nothing; once the master answers again,
    faults read every byte. (It used to read each of that master's pages retries + 1 times,
    a timeout each: some 6 minutes here.)"""
    data = make_data(seed=9, size=1024 * PAGE)
    cluster = fresh_servers.cluster()  # private: one of its masters is stopped
    upload(data, cluster.url, "stop:", cluster=True)
    src = RedisSource(cluster.url, prefix="stop:", cluster=True, timeout=0.5)
    with userfault.map(src, readahead=False, retries=1) as p:
        with paused(cluster.primaries()[1]), pytest.raises(
                PrefetchError, match=r"prefetch stopped after installing \d+ bytes: the source "
                r"timed out \(SourceError: RedisSource .*TimeoutError") as info:
            p.prefetch()
        assert info.value.poisoned == () and info.value.installed < p.size
        with memoryview(p) as v:
            assert v == data
        assert p.stats().poisoned == 0 and p.check() is None


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, SIZE - 1), st.integers(1, 5 * PAGE)), min_size=1,
                max_size=30))
def test_read_many_random_batches(stored: tuple[RedisSource, bytes],
                                  batch: list[tuple[int, int]]) -> None:
    src, data = stored
    reqs = [(off, bytearray(n)) for off, n in batch]
    src.read_many([(off, memoryview(b)) for off, b in reqs])
    for off, b in reqs:
        assert bytes(b) == expected(data, off, len(b))


def test_lean_reads_with_password_and_database(tmp_path: Path) -> None:
    """Reads on a plain redis:// URL go through the source's own RESP client: it must AUTH
    and SELECT as redis-py would, and report a refused password clearly."""
    server = require_servers(lambda: RedisServer(tmp_path / "auth"))
    server.start()
    try:
        admin = redis.Redis.from_url(server.url)
        admin.config_set("requirepass", "s3cret")  # after start: servers.py pings without AUTH
        admin.close()
        url = f"redis://:s3cret@127.0.0.1:{server.port}/3"
        data = make_data(5)
        src = upload(data, url, prefix="a:")
        assert src._lean is not None  # the lean path is the one under test
        fresh = RedisSource(url, prefix="a:")
        assert read(fresh, 0, SIZE) == data
        assert read(fresh, 7 * PAGE + 5, 3 * PAGE) == expected(data, 7 * PAGE + 5, 3 * PAGE)
        r = redis.Redis.from_url(url)
        assert r.dbsize() > 300 and redis.Redis.from_url(url.replace("/3", "/0")).dbsize() == 0
        r.close()
        bad_url = f"redis://:nope@127.0.0.1:{server.port}/3"
        with pytest.raises(SourceError, match=r"reading 'a:meta' failed: AuthenticationError"):
            RedisSource(bad_url, prefix="a:", size=SIZE, page_size=PAGE)
        # The lean reader's own AUTH: a source whose password was changed after it opened
        # (as a pickled copy would be, in a pager process).
        state = fresh.__getstate__()
        wrong = RedisSource.__new__(RedisSource)
        wrong.__setstate__({**state, "url": bad_url})
        with pytest.raises(SourceError, match=r"read \[0, 4096\).*WRONGPASS"):
            wrong.read_into(0, memoryview(bytearray(PAGE)))
    finally:
        server.stop()


def test_lean_connection_killed_while_idle_is_retried_once(redis_server: RedisServer) -> None:
    data = make_data(6)
    src = upload(data, redis_server.url, prefix=new_prefix())
    assert read(src, 0, PAGE) == data[:PAGE]  # a pooled lean connection now exists
    r = redis.Redis.from_url(redis_server.url)
    killed = r.client_kill_filter(_type="normal", skipme=True)
    assert killed >= 1
    assert read(src, 5 * PAGE, PAGE) == data[5 * PAGE: 6 * PAGE]
    r.close()


def _source(url: str, prefix: str, lean: bool, **kw: object) -> RedisSource:
    src = RedisSource(url, prefix=prefix, **kw)  # type: ignore[arg-type]
    if not lean:
        src._lean = None  # force the redis-py path: both must behave the same
    assert (src._lean is not None) == lean
    return src


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "redis-py"])
@pytest.mark.parametrize("page_size", [4096, 1 << 20])
def test_big_read_many_values_across_recv_boundaries(redis_server: RedisServer, lean: bool,
                                                     page_size: int) -> None:
    # 4 KiB values cross the receive buffer's end; 1 MiB values are bigger than the buffer and
    # mostly go from the socket straight into the destination. Short last page, a zero page.
    size = 5 * (1 << 20) + 777
    data = bytearray(random.Random(7).randbytes(size))
    data[page_size: 2 * page_size] = bytes(page_size)
    prefix = new_prefix()
    upload(bytes(data), redis_server.url, prefix, page_size)
    src = _source(redis_server.url, prefix, lean)
    buf = bytearray(size + 5000)  # past the end: zeros
    buf[:] = b"\xff" * len(buf)
    mv = memoryview(buf)
    cuts = [0, 1 << 20, (1 << 20) + 3 * 4096, 3 << 20, len(buf)]
    src.read_many([(a, mv[a: b]) for a, b in itertools.pairwise(cuts)])
    assert bytes(buf) == bytes(data) + bytes(5000)
    # Unaligned pieces, several of them in one page, and the same page twice.
    reqs = [(100, 5000), (5100, 3), (5103, 9000), (page_size - 10, 20), (0, 4096), (size - 5, 50)]
    bufs = [bytearray(b"\xff" * n) for _, n in reqs]
    src.read_many([(o, memoryview(b)) for (o, _), b in zip(reqs, bufs, strict=True)])
    for (o, n), b in zip(reqs, bufs, strict=True):
        assert bytes(b) == expected(bytes(data), o, n)


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "redis-py"])
def test_bad_pages_in_the_middle_of_a_batch(redis_server: RedisServer, lean: bool) -> None:
    data = random.Random(8).randbytes(2000 * PAGE)
    prefix = new_prefix()
    up = upload(data, redis_server.url, prefix)
    r = redis.Redis.from_url(redis_server.url)
    r.delete(up.key(1200))
    r.set(up.key(1500), b"short")  # a short value: the rest of its page reads as zeros
    src = _source(redis_server.url, prefix, lean)
    sparse = _source(redis_server.url, prefix, lean, missing="zero")
    want = bytearray(data)
    want[1500 * PAGE: 1501 * PAGE] = b"short" + bytes(PAGE - 5)
    for s in (src, sparse):
        buf = bytearray(1000 * PAGE)
        s.read_many([(0, memoryview(buf))])
        assert buf == want[: 1000 * PAGE]
    buf = bytearray(len(data))
    mv = memoryview(buf)
    reqs = [(o, mv[o: o + 256 * PAGE]) for o in range(0, len(data), 256 * PAGE)]
    with pytest.raises(SourceError, match=rf"page key '{up.key(1200)}' does not exist") as info:
        src.read_many(reqs)
    assert (info.value.offset, info.value.length) == (1024 * PAGE, 256 * PAGE)
    sparse.read_many(reqs)
    want[1200 * PAGE: 1201 * PAGE] = bytes(PAGE)
    assert buf == want
    # A value longer than a page, after the missing key: the first bad page is reported.
    r.set(up.key(1300), bytes(PAGE + 1))
    with pytest.raises(SourceError, match=rf"'{up.key(1200)}' does not exist"):
        src.read_many(reqs)
    for s in (src, sparse):
        with pytest.raises(SourceError, match=rf"'{up.key(1300)}' holds {PAGE + 1} bytes, more "
                                              "than the page size 4096"):
            s.read_many(reqs[5:])
    # The connection is still in step after those errors.
    buf2 = bytearray(PAGE)
    src.read_many([(1999 * PAGE, memoryview(buf2))])
    assert buf2 == data[1999 * PAGE:]
    r.close()


# -- generations: a source serves the upload it opened, or fails -------------------------------


def replaced_cause(old: str | None, new: str) -> str:
    return (f"the object was uploaded again (generation {old or 'none (unversioned layout)'} "
            f"when this source opened it, {new} now): its pages are gone and pages of two "
            "uploads must never be mixed; open it again to page the new version")


def test_a_reupload_is_never_mixed_with_the_open_version(redis_server: RedisServer) -> None:
    prefix = new_prefix()
    v1, v2 = make_data(1), make_data(2)
    first = upload(v1, redis_server.url, prefix)
    old = RedisSource(redis_server.url, prefix=prefix)
    sparse_old = RedisSource(redis_server.url, prefix=prefix, missing="zero")
    assert old.generation == first.generation
    seen: list[bytes] = []

    def midway(done: int, total: int) -> None:
        if done < total:  # the new pages are being written: readers still see v1 whole
            seen.append(read(old, 0, SIZE))

    second = upload(v2, redis_server.url, prefix, batch_bytes=64 * PAGE, progress=midway)
    assert seen and all(s == v1 for s in seen)
    assert second.generation not in (None, first.generation)
    cause = replaced_cause(first.generation, second.generation)
    buf = bytearray(b"\xaa" * PAGE)
    with pytest.raises(SourceError) as info:
        old.read_into(5 * PAGE, memoryview(buf))
    assert str(info.value) == (f"RedisSource {redis_server.url} prefix {prefix!r}: read [20480, "
                               f"24576) (4096 bytes) failed: page key {old.key(5)!r} does not "
                               f"exist: {cause}")
    assert buf == b"\xaa" * PAGE
    with pytest.raises(SourceError) as info:  # absent is not zero once the object was replaced
        sparse_old.read_into(0, memoryview(bytearray(3 * PAGE)))
    assert str(info.value).endswith(f"failed: {cause}")
    with pytest.raises(SourceError) as info:
        old.write_from(0, memoryview(bytes(PAGE)))
    assert str(info.value).endswith(f"failed: {cause}; nothing was written")
    # The old generation is gone from Redis; a pickled copy keeps the pin (and the refusal).
    r = redis.Redis.from_url(redis_server.url)
    assert r.keys(f"{prefix}{first.generation}:*") == []
    r.close()
    clone = pickle.loads(pickle.dumps(old))
    assert clone.generation == first.generation
    with pytest.raises(SourceError, match="the object was uploaded again"):
        read(clone, 0, PAGE)
    assert read(RedisSource(redis_server.url, prefix=prefix), 0, SIZE) == v2


def test_a_failed_upload_leaves_the_object_as_it_was(redis_server: RedisServer) -> None:
    prefix = new_prefix()
    v1 = make_data(6)
    src = upload(v1, redis_server.url, prefix)

    def interrupted(done: int, total: int) -> None:
        if done >= 128 * PAGE:
            raise RuntimeError("interrupted")

    with pytest.raises(SourceError, match=rf"upload to Redis .* failed after 524288 of {SIZE} "
                                          r"bytes: RuntimeError: interrupted"):
        upload(make_data(7), redis_server.url, prefix, batch_bytes=64 * PAGE,
               progress=interrupted)
    r = redis.Redis.from_url(redis_server.url)
    assert sorted(r.keys(f"{prefix}*")) == sorted(  # the new generation's pages were deleted
        [f"{prefix}meta".encode()] + [src.key(i).encode() for i in range(301)])
    r.close()
    assert read(src, 0, SIZE) == v1
    assert RedisSource(redis_server.url, prefix=prefix).generation == src.generation


def test_a_deleted_object(redis_server: RedisServer) -> None:
    prefix = new_prefix()
    src = upload(make_data(3), redis_server.url, prefix)
    r = redis.Redis.from_url(redis_server.url)
    r.delete(f"{prefix}meta", src.key(0))
    with pytest.raises(SourceError) as info:
        read(src, 0, PAGE)
    assert str(info.value).endswith(
        f"page key {src.key(0)!r} does not exist: the object was deleted (generation "
        f"{src.generation} when this source opened it; its {prefix}meta key is gone)")
    r.close()


def test_unversioned_data_and_an_upload_over_it(redis_server: RedisServer) -> None:
    """Pages in the unversioned layout (meta version 1, as older uploads wrote): readable; an
    upload of a new generation deletes them, and the old source says so."""
    prefix = new_prefix()
    data = make_data(4)
    r = redis.Redis.from_url(redis_server.url)
    for i in range(0, SIZE, PAGE):
        r.set(f"{prefix}{i // PAGE}", data[i: i + PAGE])
    r.set(f"{prefix}meta", json.dumps({"size": SIZE, "page_size": PAGE, "version": 1}))
    legacy = RedisSource(redis_server.url, prefix=prefix)
    assert legacy.generation is None and legacy.key(3) == f"{prefix}3"
    assert read(legacy, 0, SIZE) == data
    new = upload(make_data(5), redis_server.url, prefix)
    assert r.exists(f"{prefix}3") == 0  # the unversioned pages were deleted
    with pytest.raises(SourceError) as info:
        read(legacy, 3 * PAGE, PAGE)
    assert str(info.value).endswith(f"does not exist: {replaced_cause(None, new.generation)}")
    r.close()
