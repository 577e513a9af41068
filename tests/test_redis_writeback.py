"""Writable pagers on Redis, for real: ``userfault.map(RedisSource(...), writable=True)`` on a
redis-server, on a standalone master with a replica, and on a Redis Cluster with one replica per
master, where a page counts as written only once a replica acknowledged it (``WAIT``).

Replicas are paused with SIGSTOP (the master keeps its link and simply hears no
acknowledgement) or killed and started again; every test that pauses one resumes it."""

from __future__ import annotations

import contextlib
import itertools
import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.cluster

import userfault
from pager_helpers import settled, wait_until
from server_fixtures import FreshServers, require_servers
from servers import HOST, RedisCluster, RedisServer, paused
from userfault.errors import PagerError
from userfault.sources.redis import RedisSource, upload

PAGE = 4096
PAGES = 96
_prefixes = itertools.count()


def new_prefix(tag: str = "") -> str:
    n = next(_prefixes)
    return f"{{{tag}{n}}}:" if tag else f"wb{n}:"


def make_data(seed: int, pages: int = PAGES) -> bytes:
    return random.Random(seed).randbytes(pages * PAGE)


def read_all(src: RedisSource) -> bytes:
    buf = bytearray(src.size)
    src.read_into(0, memoryview(buf))
    return bytes(buf)


def fresh_read(url: str, prefix: str, *, cluster: bool = False) -> bytes:
    """The object as a new reader sees it."""
    with RedisSource(url, prefix=prefix, cluster=cluster) as src:
        return read_all(src)


def cli_get(port: int, key: str, *, replica: bool = False) -> bytes:
    """``GET key`` with redis-cli on one node (on a replica after ``READONLY``)."""
    cmds = (f"READONLY\nGET {key}\n" if replica else f"GET {key}\n").encode()
    res = subprocess.run(["redis-cli", "-h", HOST, "-p", str(port), "--no-raw"], input=cmds,
                         capture_output=True, timeout=10, check=True)
    lines = res.stdout.decode().splitlines()
    value = lines[-1]
    assert value.startswith('"') and value.endswith('"'), lines
    # --no-raw quotes the value with C escapes: \xNN for bytes outside printable ASCII
    return value[1:-1].encode("latin-1").decode("unicode_escape").encode("latin-1")


def node_info(port: int, section: str) -> dict[str, Any]:
    """``INFO section`` of the node at ``port``."""
    r = redis.Redis(host=HOST, port=port, socket_timeout=10)
    try:
        return dict(r.info(section))
    finally:
        r.close()


def wait_calls(port: int) -> int:
    """How many WAIT commands the node ran (INFO commandstats)."""
    return int(node_info(port, "commandstats").get("cmdstat_wait", {}).get("calls", 0))


def master_of(cluster: RedisCluster, key: str) -> int:
    """The port of the master that owns ``key``'s slot."""
    rc = redis.cluster.RedisCluster.from_url(cluster.url, socket_timeout=10)
    try:
        return int(rc.get_node_from_key(key).port)
    finally:
        rc.close()


def caught_up(port: int) -> bool:
    """Whether every replica of the master at ``port`` has all of its replication stream."""
    info = node_info(port, "replication")
    replicas = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
    return bool(replicas) and all(int(v["offset"]) >= int(info["master_repl_offset"])
                                  for v in replicas)


def write_page(view: memoryview, index: int, payload: bytes) -> None:
    view[index * PAGE: index * PAGE + len(payload)] = payload


def expect_short(err: pytest.ExceptionInfo[PagerError], port: int, wait: str) -> None:
    """The flush error names WAIT, the master and the count of acknowledgements."""
    assert (f"WAIT 1 {int(float(wait) * 1000)}: only 0 of 1 replica(s) of {HOST}:{port} "
            f"acknowledged it within {wait} s; the master has the bytes, but they do not count "
            "as written" in str(err.value)), str(err.value)
    assert "stays dirty" in str(err.value)


# -- options ----------------------------------------------------------------------------------


def test_replicas_defaults_validation_and_pickling(redis_server: RedisServer,
                                                   redis_cluster_replicas: RedisCluster) -> None:
    prefix = new_prefix()
    src = upload(make_data(1, 4), redis_server.url, prefix)
    assert src.replicas == 0  # standalone: no WAIT unless asked
    assert RedisSource(redis_server.url, prefix=prefix, replicas=2).replicas == 2
    cprefix = new_prefix()
    csrc = upload(make_data(2, 4), redis_cluster_replicas.url, cprefix, cluster=True)
    assert csrc.replicas == 1  # a cluster: one replica must have every write
    assert upload(make_data(2, 4), redis_cluster_replicas.url, new_prefix(), cluster=True,
                  replicas=0).replicas == 0
    clone = pickle.loads(pickle.dumps(RedisSource(redis_cluster_replicas.url, prefix=cprefix,
                                                  cluster=True, wait_timeout=0.25)))
    assert clone.replicas == 1 and "replicas=1" in repr(clone)
    for bad in (-1, 1.5, "1", True):
        with pytest.raises(ValueError) as info:
            RedisSource(redis_server.url, prefix=prefix, replicas=bad)  # type: ignore[arg-type]
        assert str(info.value) == ("replicas must be an int >= 0 (how many replicas must "
                                   f"acknowledge a write; 0: do not wait), not {bad!r}")
    for bad_wait, timeout in ((0, 10.0), (-1.0, 10.0), (10.0, 10.0), (float("nan"), 10.0)):
        with pytest.raises(ValueError) as info:
            RedisSource(redis_server.url, prefix=prefix, replicas=1, wait_timeout=bad_wait,
                        timeout=timeout)
        assert str(info.value) == (
            "wait_timeout must be a number of seconds > 0 and less than timeout=10 (the socket "
            f"timeout must outlast WAIT), not {bad_wait!r}")
    refused = new_prefix()
    with pytest.raises(ValueError, match="replicas must be an int"):
        upload(make_data(3, 1), redis_server.url, refused, replicas=-1)
    r = redis.Redis.from_url(redis_server.url)
    assert r.keys(f"{refused}*") == []  # refused before anything was written
    r.close()


# -- a standalone server -----------------------------------------------------------------------


def test_flush_and_close_write_pages_home(redis_server: RedisServer) -> None:
    prefix = new_prefix()
    data = bytearray(make_data(10))
    src = upload(bytes(data), redis_server.url, prefix)
    waits = wait_calls(redis_server.port)
    pager = userfault.map(src, writable=True, readahead=False)
    try:
        with pager.view() as v:
            assert bytes(v[5 * PAGE: 6 * PAGE]) == data[5 * PAGE: 6 * PAGE]
            writes = [(3 * PAGE, b"three" * 100), (7 * PAGE + 1000, b"mid-page"),
                      (20 * PAGE - 5, b"across two pages"), (40 * PAGE, bytes(PAGE))]
            for off, payload in writes:
                v[off: off + len(payload)] = payload
                data[off: off + len(payload)] = payload
            assert pager.flush() == 5 * PAGE  # pages 3, 7, 19, 20 and 40
            assert fresh_read(redis_server.url, prefix) == data
            assert cli_get(redis_server.port, src.key(7))[1000:1008] == b"mid-page"
            assert cli_get(redis_server.port, src.key(40)) == b""  # a zero page: empty value
            assert pager.flush() == 0  # nothing written since
            # A page written again after a flush is written again on the next one.
            v[3 * PAGE: 3 * PAGE + 5] = b"again"
            data[3 * PAGE: 3 * PAGE + 5] = b"again"
            assert pager.flush() == PAGE
            assert fresh_read(redis_server.url, prefix) == data
            # close() flushes what is left.
            v[90 * PAGE: 90 * PAGE + 4] = b"last"
            data[90 * PAGE: 90 * PAGE + 4] = b"last"
    finally:
        pager.close()
    assert pager.closed and fresh_read(redis_server.url, prefix) == data
    assert wait_calls(redis_server.port) == waits  # replicas=0: writes never WAIT


@contextlib.contextmanager
def master_with_replica(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer, redis.Redis]]:
    """A standalone master, its replica (link up) and a client of the replica; stopped after."""
    master = require_servers(lambda: RedisServer(
        tmp_path / "master", extra_args=["--repl-diskless-sync-delay", "0"]).start())
    replica: RedisServer | None = None
    try:
        replica = RedisServer(tmp_path / "replica", extra_args=[
            "--replicaof", HOST, str(master.port)]).start()
        r = redis.Redis(host=HOST, port=replica.port, socket_timeout=10)
        assert wait_until(lambda: r.info("replication")["master_link_status"] == "up", 20)
        try:
            yield master, replica, r
        finally:
            r.close()
    finally:
        if replica is not None:
            replica.stop()
        master.stop()


def test_standalone_master_with_a_replica_waits(tmp_path: Path) -> None:
    with master_with_replica(tmp_path) as (master, replica, r):
        prefix = new_prefix()
        data = bytearray(make_data(11, 16))
        src = upload(bytes(data), master.url, prefix, replicas=1)
        pager = userfault.map(RedisSource(master.url, prefix=prefix, replicas=1,
                                          wait_timeout=0.5), writable=True, retries=1)
        try:
            with pager.view() as v:
                write_page(v, 2, b"replicated")
                data[2 * PAGE: 2 * PAGE + 10] = b"replicated"
                waits = wait_calls(master.port)
                assert pager.flush() == PAGE
                assert wait_calls(master.port) > waits
                # WAIT returned 1: the replica has the bytes (it answers reads itself).
                assert r.get(src.key(2)) == bytes(data[2 * PAGE: 3 * PAGE])
                with paused(replica):
                    write_page(v, 5, b"not yet")
                    data[5 * PAGE: 5 * PAGE + 7] = b"not yet"
                    with pytest.raises(PagerError) as info:
                        pager.flush()
                    expect_short(info, master.port, "0.5")
                    assert pager.stats().dirty_pages == 1
                # the replica is back: once it has caught up, the page goes home within 0.5 s
                assert wait_until(lambda: caught_up(master.port), 20)
                assert pager.flush() == PAGE
                assert pager.stats().dirty_pages == 0
                assert r.get(src.key(5)) == bytes(data[5 * PAGE: 6 * PAGE])
        finally:
            pager.close()
        assert fresh_read(master.url, prefix) == data


def uploaded_once(master: RedisServer, seed: int
                  ) -> tuple[str, bytes, bytes, redis.Redis, set[bytes]]:
    """A prefix uploaded once with ``replicas=1`` (10 s to acknowledge): ``(prefix, its data,
    the data of a second upload, a client of the master, the keys of the first upload)``."""
    prefix = new_prefix()
    old, new = make_data(seed, 16), make_data(seed + 1, 16)
    upload(old, master.url, prefix, replicas=1, timeout=30, wait_timeout=10)
    m = redis.Redis(host=HOST, port=master.port, socket_timeout=10)
    return prefix, old, new, m, set(m.keys(f"{prefix}*"))


def test_an_upload_publishes_only_what_a_replica_acknowledged(tmp_path: Path) -> None:
    """``upload(replicas=1)`` ends every batch in WAIT: with the replica stopped it fails,
    naming WAIT and the master, deletes what it wrote and leaves the previous generation
    current; with the replica back the same upload is published, and the replica has it."""
    with master_with_replica(tmp_path) as (master, replica, r):
        prefix, old, new, m, keys_before = uploaded_once(master, 21)
        with paused(replica), pytest.raises(userfault.SourceError) as info:
            upload(new, master.url, prefix, replicas=1, wait_timeout=0.5)
        assert (f"WAIT 1 500: only 0 of 1 replica(s) of {HOST}:{master.port} acknowledged "
                "it within 0.5 s; nothing was published") in str(info.value), str(info.value)
        assert fresh_read(master.url, prefix) == old
        assert set(m.keys(f"{prefix}*")) == keys_before  # cleaned up
        # (the replica catches up after its pause: wait for it up to 10 s, not the default 1)
        src = upload(new, master.url, prefix, replicas=1, timeout=30, wait_timeout=10)
        assert fresh_read(master.url, prefix) == new
        assert r.get(src.key(15)) == new[15 * PAGE:]  # the replica has it: WAIT returned 1
        m.close()


def test_an_upload_waits_for_its_meta_key_too(tmp_path: Path) -> None:
    """With ``replicas=1`` the meta key's SET (the publication) ends in WAIT as well: a
    replica that stops after the last batch was acknowledged makes the upload fail, saying
    the generation is published on the master, and the previous generation is kept."""
    with master_with_replica(tmp_path) as (master, replica, _):
        prefix, _, new, m, old_keys = uploaded_once(master, 31)
        assert replica.proc is not None
        stopped: list[int] = []

        def stop_after_the_last_batch(done: int, total: int) -> None:
            if done == total:
                os.kill(replica.proc.pid, signal.SIGSTOP)  # type: ignore[union-attr]
                stopped.append(1)

        try:
            with pytest.raises(userfault.SourceError) as info:
                upload(new, master.url, prefix, replicas=1, wait_timeout=0.5,
                       progress=stop_after_the_last_batch)
        finally:
            if stopped:
                os.kill(replica.proc.pid, signal.SIGCONT)
        assert stopped and "the new generation is published on the master" in str(info.value)
        assert "only 0 of 1 replica(s) of the master of" in str(info.value), str(info.value)
        assert fresh_read(master.url, prefix) == new  # the master serves the new one
        assert old_keys <= set(m.keys(f"{prefix}*"))  # and still has the previous one
        m.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("replicas", "finish"), [(0, True), (0, False), (1, True), (1, False)],
                         ids=["moved", "ask", "moved-wait", "ask-wait"])
def test_an_upload_goes_on_while_a_slot_of_it_moves(fresh_servers: FreshServers,
                                                    replicas: int, finish: bool) -> None:
    """A slot of a later batch moves to another master during an upload (MOVED), or is left
    migrating (ASK): the upload follows it (redis-py's cluster pipeline without WAIT; with
    WAIT, a retry after the slot map is refreshed, or ASKING and the write on the importing
    node, with a WAIT there) and every page reads back right."""
    cluster = fresh_servers.cluster(replicas=replicas)
    data = make_data(41, 64)
    prefix = new_prefix()
    rc = redis.cluster.RedisCluster.from_url(cluster.url, socket_timeout=10)
    moved: list[int] = []

    def move_a_later_slot(done: int, total: int) -> None:
        if moved:
            return
        first = next(iter(rc.scan_iter(match=f"{prefix}*:0", target_nodes=rc.ALL_NODES)))
        key = first.decode().rsplit(":", 1)[0] + ":40"  # page 40: a later batch
        before = rc.get_node_from_key(key).port
        to = next(m.port for m in cluster.primaries() if m.port != before)
        cluster.move_slot(rc.keyslot(key), to, finish=finish)
        moved.append(to)

    try:
        src = upload(data, cluster.url, prefix, cluster=True, batch_bytes=8 * PAGE,
                     progress=move_a_later_slot, replicas=replicas or None, timeout=30,
                     wait_timeout=10)
        assert moved and fresh_read(cluster.url, src.prefix, cluster=True) == data
    finally:
        rc.close()


def test_writes_keep_to_the_generation_they_opened(redis_server: RedisServer) -> None:
    prefix = new_prefix()
    data = make_data(12, 8)
    src = upload(data, redis_server.url, prefix)
    r = redis.Redis.from_url(redis_server.url)
    meta = r.get(f"{prefix}meta")
    pager = userfault.map(src, writable=True, retries=1)
    try:
        with pager.view() as v:
            write_page(v, 1, b"first generation")
            assert pager.flush() == PAGE
            newer = make_data(13, 8)
            new_gen = upload(newer, redis_server.url, prefix).generation
            write_page(v, 2, b"too late")
            with pytest.raises(PagerError) as info:
                pager.flush()
            assert (f"the object was uploaded again (generation {src.generation} when this "
                    f"source opened it, {new_gen} now)") in str(info.value)
            assert "nothing was written" in str(info.value)
            assert pager.stats().dirty_pages == 1
            assert fresh_read(redis_server.url, prefix) == newer  # never mixed
            # Put the old generation's meta key back (its page keys are gone; page 2 is all
            # this write needs): the page that stayed dirty is written on close.
            r.set(f"{prefix}meta", meta)
    finally:
        pager.close()
    assert r.get(src.key(2))[:8] == b"too late"
    r.close()


# -- Redis Cluster with replicas ---------------------------------------------------------------


def test_cluster_flush_waits_on_every_master_that_took_keys(
        redis_cluster_replicas: RedisCluster) -> None:
    cluster = redis_cluster_replicas
    prefix = new_prefix()
    data = bytearray(make_data(20))
    src = upload(bytes(data), cluster.url, prefix, cluster=True)
    owner = {i: master_of(cluster, src.key(i)) for i in range(PAGES)}
    masters = [m.port for m in cluster.primaries()]
    assert set(owner.values()) == set(masters)  # the pages spread over all three masters
    # Two pages of each master, never adjacent (each page is a write-back of its own).
    chosen = [i for m in masters for i in [j for j in range(0, PAGES, 2) if owner[j] == m][:2]]
    waits = {m: wait_calls(m) for m in masters}
    pager = userfault.map(src, writable=True, readahead=False)
    try:
        with pager.view() as v:
            for i in chosen:
                payload = f"page {i} on {owner[i]}".encode()
                write_page(v, i, payload)
                data[i * PAGE: i * PAGE + len(payload)] = payload
            assert pager.flush() == len(chosen) * PAGE
            for m in masters:
                assert wait_calls(m) > waits[m], f"no WAIT on master {m}"
            # Acknowledged: every written page is on its master's replica.
            for i in chosen:
                (replica,) = cluster.replicas_of(owner[i])
                assert cli_get(replica.port, src.key(i), replica=True) == bytes(
                    data[i * PAGE: (i + 1) * PAGE])
            assert fresh_read(cluster.url, prefix, cluster=True) == data
            v[chosen[0] * PAGE: chosen[0] * PAGE + 5] = b"again"
            data[chosen[0] * PAGE: chosen[0] * PAGE + 5] = b"again"
            assert pager.flush() == PAGE
            v[PAGES * PAGE - 4:] = b"tail"
            data[-4:] = b"tail"
    finally:
        pager.close()
    assert fresh_read(cluster.url, prefix, cluster=True) == data


def pager_over_one_master(cluster: RedisCluster, seed: int, tag: str
                          ) -> tuple[bytearray, RedisSource, int, RedisServer, userfault.Pager]:
    """Pages uploaded under a hash tag (all on one master) and a writable pager over them that
    waits 0.5 s for a replica: ``(data, source, master's port, its replica, pager)``."""
    prefix = new_prefix(tag)
    data = bytearray(make_data(seed, 16))
    src = upload(bytes(data), cluster.url, prefix, cluster=True)
    master = master_of(cluster, src.key(0))
    (replica,) = cluster.replicas_of(master)
    pager = userfault.map(RedisSource(cluster.url, prefix=prefix, cluster=True,
                                      wait_timeout=0.5), writable=True, retries=1)
    return data, src, master, replica, pager


def test_cluster_paused_replica_keeps_the_page_dirty(
        redis_cluster_replicas: RedisCluster) -> None:
    cluster = redis_cluster_replicas
    data, src, master, replica, pager = pager_over_one_master(cluster, 21, "p")
    try:
        with pager.view() as v:
            try:
                with paused(replica):
                    write_page(v, 4, b"unacknowledged")
                    data[4 * PAGE: 4 * PAGE + 14] = b"unacknowledged"
                    with pytest.raises(PagerError) as info:
                        pager.flush()
                    expect_short(info, master, "0.5")
                    assert pager.stats().dirty_pages == 1
                    # WAIT rolls nothing back: the master has the bytes.
                    assert cli_get(master, src.key(4))[:14] == b"unacknowledged"
                    with pytest.raises(PagerError, match="only 0 of 1 replica"):
                        pager.flush()  # still dirty: written again, refused again
            finally:
                cluster.wait_ready(30)
            assert wait_until(lambda: caught_up(master), 20)  # then WAIT 0.5 s is enough
            assert pager.flush() == PAGE
            assert pager.stats().dirty_pages == 0
            assert cli_get(replica.port, src.key(4), replica=True) == bytes(
                data[4 * PAGE: 5 * PAGE])
    finally:
        pager.close()
    assert fresh_read(cluster.url, src.prefix, cluster=True) == data


@pytest.mark.timeout(120)
def test_cluster_killed_replica_then_restarted(fresh_servers: FreshServers) -> None:
    cluster = fresh_servers.cluster(replicas=1)  # private: this test kills a replica
    data, src, master, replica, pager = pager_over_one_master(cluster, 22, "k")
    try:
        with pager.view() as v:
            replica.kill()
            write_page(v, 9, b"while the replica is down")
            data[9 * PAGE: 9 * PAGE + 25] = b"while the replica is down"
            with pytest.raises(PagerError) as info:
                pager.flush()
            expect_short(info, master, "0.5")
            assert pager.stats().dirty_pages == 1
            replica.start()  # rejoins from its nodes.conf and syncs in full
            cluster.wait_ready(30)
            assert wait_until(lambda: caught_up(master), 20)  # then WAIT 0.5 s is enough
            assert pager.flush() == PAGE
            assert cli_get(replica.port, src.key(9), replica=True) == bytes(
                data[9 * PAGE: 10 * PAGE])
    finally:
        pager.close()
    assert fresh_read(cluster.url, src.prefix, cluster=True) == data


def test_cluster_eviction_writes_back_through_wait(redis_cluster_replicas: RedisCluster) -> None:
    cluster = redis_cluster_replicas
    prefix = new_prefix()
    data = bytearray(make_data(23, 64))
    # a replica may take more than the default second to acknowledge on a loaded machine
    src = upload(bytes(data), cluster.url, prefix, cluster=True, timeout=30, wait_timeout=10)
    with userfault.map(src, writable=True, readahead=False, max_resident=16 * PAGE) as pager:
        with pager.view() as v:
            for i in range(64):  # four times the budget: dirty pages are written to be evicted
                payload = f"evicted {i}".encode()
                write_page(v, i, payload)
                data[i * PAGE: i * PAGE + len(payload)] = payload
            assert bytes(v) == data  # evicted pages fault in again from Redis
        pager.flush()
        # every page is clean now: the evictor gives them back (how soon is scheduling: its
        # write-backs, each a WAIT, may still be under way when the writes are done)
        stats = settled(pager, lambda s: s.resident_bytes <= 16 * PAGE, timeout=60)
        assert stats.resident_bytes <= 16 * PAGE
        assert stats.evictions >= 48 and stats.writebacks >= 64
    assert fresh_read(cluster.url, prefix, cluster=True) == data


# -- crashes -----------------------------------------------------------------------------------

_WRITER = """
    import sys, time, userfault
    from userfault.sources.redis import RedisSource
    src = RedisSource({url!r}, prefix={prefix!r}, cluster={cluster!r})
    pager = userfault.map(src, writable=True, readahead=False)
    view = pager.view()
    view[{a}: {a} + 7] = b"flushed"
    print("flushed", pager.flush(), flush=True)
    view[{b}: {b} + 9] = b"unflushed"
    print("written", flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("kind", ["standalone", "cluster"])
def test_sigkilled_writer_after_a_flush(kind: str, redis_server: RedisServer,
                                        redis_cluster_replicas: RedisCluster) -> None:
    cluster = kind == "cluster"
    url = redis_cluster_replicas.url if cluster else redis_server.url
    prefix = new_prefix()
    data = bytearray(make_data(30, 32))
    upload(bytes(data), url, prefix, cluster=cluster)
    code = textwrap.dedent(_WRITER.format(url=url, prefix=prefix, cluster=cluster,
                                          a=3 * PAGE + 10, b=20 * PAGE))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == f"flushed {PAGE}\n"
        assert proc.stdout.readline() == "written\n"
        proc.kill()
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == -signal.SIGKILL
    data[3 * PAGE + 10: 3 * PAGE + 17] = b"flushed"
    # The flushed page is there; the unflushed write is lost, and nothing else changed.
    assert fresh_read(url, prefix, cluster=cluster) == data
    if cluster:
        key = f"{RedisSource(url, prefix=prefix, cluster=True).key(3)}"
        (replica,) = redis_cluster_replicas.replicas_of(master_of(redis_cluster_replicas, key))
        assert cli_get(replica.port, key, replica=True)[10:17] == b"flushed"


def test_cluster_write_after_its_slot_moved(fresh_servers: FreshServers) -> None:
    cluster = fresh_servers.cluster(replicas=1)  # private: this test reshards it
    prefix = new_prefix()
    data = bytearray(make_data(24, 16))
    src = upload(bytes(data), cluster.url, prefix, cluster=True)
    rc = redis.cluster.RedisCluster.from_url(cluster.url, socket_timeout=10)
    slot = rc.keyslot(src.key(2))
    assert rc.keyslot(f"{prefix}meta") != slot  # (reading the meta key would learn the move)
    rc.close()
    before = master_of(cluster, src.key(2))
    after = next(m.port for m in cluster.primaries() if m.port != before)
    pager = userfault.map(src, writable=True, readahead=False)
    try:
        with pager.view() as v:
            write_page(v, 2, b"before the move")
            data[2 * PAGE: 2 * PAGE + 15] = b"before the move"
            assert pager.flush() == PAGE
            cluster.move_slot(slot, after)
            assert master_of(cluster, src.key(2)) == after
            # The pager process's slot map is stale now: MOVED, then a retry on the new owner.
            write_page(v, 2, b"after the move")
            data[2 * PAGE: 2 * PAGE + 14] = b"after the move"
            assert pager.flush() == PAGE
            assert pager.stats().retries >= 1
            (replica,) = cluster.replicas_of(after)
            assert cli_get(replica.port, src.key(2), replica=True)[:14] == b"after the move"
    finally:
        pager.close()
    assert fresh_read(cluster.url, prefix, cluster=True) == data
