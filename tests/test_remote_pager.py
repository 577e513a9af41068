"""`userfault.map` over a real page server: byte-exact faults, URLs with their secret, a live
Pager exported by another process, the Firecracker pager's memory file, and a server killed
under a pager (SIGBUS with a logged cause, never zeros)."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

import userfault
from remote_helpers import OTHER_SECRET, ServeProcess, serve_process, write_secret
from test_firecracker_serve import check_all, server, touch, vmm
from userfault.remote import AuthenticationError, PageServerSource
from userfault.sources.snapshot import create_snapshot

SIZE = (6 << 20) + 4000
PAGE = 4096


@pytest.fixture(scope="module")
def blob(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    data = random.Random(21).randbytes(SIZE)
    path = tmp_path_factory.mktemp("rpager") / "mem.bin"
    path.write_bytes(data)
    return path, data


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, blob: tuple[Path, bytes]
           ) -> Iterator[ServeProcess]:
    path, data = blob
    tmp = tmp_path_factory.mktemp("rpager-srv")
    ufs = tmp / "mem.ufs"
    create_snapshot(data, ufs)
    with serve_process(tmp, [f"mem={path}", f"snap={ufs}"]) as srv:
        yield srv


@pytest.mark.parametrize("readahead", [False, True])
def test_map_of_a_page_server_source_is_byte_exact(served: ServeProcess,
                                                   blob: tuple[Path, bytes],
                                                   readahead: bool) -> None:
    _, data = blob
    src = PageServerSource(served.url("mem"), secret_file=served.secret_file)
    with userfault.map(src, readahead=readahead) as mem:
        assert mem.runtime == "process"
        view = memoryview(mem)
        rng = random.Random(5)
        for _ in range(300):
            off = rng.randrange(SIZE)
            assert view[off] == data[off], off
        assert hashlib.sha256(view[:SIZE]).digest() == hashlib.sha256(data).digest()
        assert bytes(view[SIZE:]) == bytes(len(mem) - SIZE)  # the last page's zero tail
        view.release()
        stats = mem.stats()
        mem.check()
    assert stats.faults > 0 and stats.errors == 0
    src.close()


def test_map_of_a_uf_url_string_and_a_snapshot_export(served: ServeProcess,
                                                      blob: tuple[Path, bytes]) -> None:
    _, data = blob
    url = f"{served.url('snap')}?secret_file={served.secret_file}"
    with userfault.map(url) as mem, memoryview(mem) as view:
        assert bytes(view[:SIZE]) == data
    # The secret from the environment, for callers that can pass neither argument nor query.
    script = f"""
        import hashlib, userfault
        with userfault.map({served.url('mem')!r}) as mem:
            with memoryview(mem) as v:
                print(hashlib.sha256(v[:{SIZE}]).hexdigest())
    """
    env = dict(os.environ, USERFAULT_SECRET_FILE=str(served.secret_file))
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True,
                       text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == hashlib.sha256(data).hexdigest()


def test_map_with_the_wrong_secret_fails_before_mapping(tmp_path: Path,
                                                        served: ServeProcess) -> None:
    wrong = write_secret(tmp_path / "wrong", OTHER_SECRET)
    with pytest.raises(AuthenticationError, match="the secret does not match"):
        userfault.map(f"{served.url('mem')}?secret_file={wrong}")
    with pytest.raises(ValueError, match=r"no secret; pass secret_file=\.\.\., add "
                       r"\?secret_file=PATH to the URL, or set USERFAULT_SECRET_FILE"):
        PageServerSource(served.url("mem"))


_KILLED = """
    import sys, userfault
    from userfault.remote import PageServerSource
    src = PageServerSource({url!r}, secret_file={secret!r}, timeout=2, reconnect_timeout=1)
    pager = userfault.Pager(src, readahead=False, retries=1)
    view = memoryview(pager)
    print("ready", view[0], flush=True)
    sys.stdin.readline()
    print("read", view[{far}], flush=True)
"""


def test_killed_server_poisons_the_faults_never_zeros(tmp_path: Path,
                                                      blob: tuple[Path, bytes]) -> None:
    path, data = blob
    far = 5 * (1 << 20) + 123
    with serve_process(tmp_path, [f"mem={path}"]) as srv:
        script = textwrap.dedent(_KILLED.format(url=srv.url("mem"),
                                                secret=str(srv.secret_file), far=far))
        proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None and proc.stdin is not None
            assert proc.stdout.readline() == f"ready {data[0]}\n"
            srv.kill()  # SIGKILL: the connections die with it
            proc.stdin.write("go\n")
            proc.stdin.flush()
            out, err = proc.communicate(timeout=40)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == -signal.SIGBUS, err
    assert "read" not in out  # the access never returned a value
    assert f"(offset {far // PAGE * PAGE:#x} of PageServerSource" in err
    assert "connection refused (is the server running?)" in err
    assert "poisoned" in err


_EXPORTER = """
    import sys, userfault
    from userfault.remote import PageServer
    pager = userfault.map({path!r})
    server = PageServer.from_secret_file({secret!r})
    server.export_buffer("live", pager, writable=True)
    (ep,) = server.start_in_thread("tcp://127.0.0.1:0")
    print("port", ep.port, flush=True)
    for line in sys.stdin:
        cmd, arg = line.split()
        view = memoryview(pager)
        if cmd == "poke":
            view[int(arg):int(arg) + 8] = b"POKEPOKE"
            print("poked", flush=True)
        elif cmd == "peek":
            print("peek", bytes(view[int(arg):int(arg) + 8]).hex(), flush=True)
        view.release()
        if cmd == "quit":
            break
    server.close()  # withdraws the export: the pager's memory is no longer pinned
    pager.close()
    print("closed", flush=True)
"""


def test_a_live_pager_exported_by_another_process(tmp_path: Path,
                                                  blob: tuple[Path, bytes]) -> None:
    """Process A maps a file lazily and exports that memory live; we map A's memory remotely:
    a remote region over a lazy local one, both byte-exact, and writes flow both ways."""
    path, data = blob
    secret = write_secret(tmp_path / "secret")
    script = textwrap.dedent(_EXPORTER.format(path=str(path), secret=str(secret)))
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None

        def ask(line: str) -> str:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(line + "\n")
            proc.stdin.flush()
            return proc.stdout.readline().strip()

        port = int(proc.stdout.readline().split()[1])
        url = f"uf://127.0.0.1:{port}/live"
        src = PageServerSource(url, secret_file=secret)
        assert src.size == len(data) // PAGE * PAGE + PAGE and src.writable
        with userfault.map(src) as mem, memoryview(mem) as view:
            assert bytes(view[:SIZE]) == data
        assert ask("poke 12288") == "poked"  # A writes its memory: a fresh read sees it
        buf = bytearray(16)
        src.read_into(12284, memoryview(buf))
        assert bytes(buf) == data[12284:12288] + b"POKEPOKE" + data[12296:12300]
        src.write_from(40960, memoryview(b"from afar"))  # and we write into A's memory
        assert ask("peek 40960") == "peek " + b"from afa".hex()
        src.close()
        assert ask("quit x") == "closed"
        proc.stdin.close()
        assert proc.wait(20) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_firecracker_memory_file_over_the_page_server(tmp_path: Path) -> None:
    """`userfault firecracker serve --mem-file uf://...`: guest memory from a remote export,
    checked byte for byte by the protocol-faithful stand-in VMM."""
    data = random.Random(31).randbytes(16 << 20)
    mem = tmp_path / "vm.mem"
    mem.write_bytes(data)
    with serve_process(tmp_path, [f"vm={mem}"]) as pages:
        url = f"{pages.url('vm')}?secret_file={pages.secret_file}"
        with server(tmp_path, url) as fc, vmm([(8 << 20, 0), (4 << 20, 12 << 20)]) as v:
            v.connect(fc.socket)
            (r0, _), (r1, _) = v.regions
            touch(r0.address, r0.size, 3 * PAGE)
            touch(r1.address, r1.size, PAGE)
            check_all(v, data)
            (rep,) = fc.stop()
        assert rep["faults"] > 0 and rep["bytes_installed"] >= 12 << 20
        assert "authenticated" in pages.stderr()
