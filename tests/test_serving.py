"""The serving layer: one config, validated once; sources of the user's own script.

``ServeConfig`` errors name the option and its allowed range; the config crosses into the pager
process as itself. A ``PageSource`` class defined in the user's script, or in a module beside
it when the script is run from another directory, works in the pager process.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import userfault
from userfault import ServeConfig, _native

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(("options", "message"), [
    ({"chunk": -1}, r"^chunk must be between 0 and 67108864 bytes \(64\.0 MiB\), not -1$"),
    ({"chunk": 1 << 40}, r"^chunk must be between 0 and 67108864 bytes"),
    ({"chunk": "12Q"}, r"^chunk: invalid size '12Q': use bytes or a K, M, G suffix$"),
    ({"chunk": True}, r"^chunk must be a byte count \(an int or a size such as '64K'\), not True$"),
    ({"readahead": ("4M", "64K")}, r"^readahead min \(4\.0 MiB\) is larger than readahead max "
                                   r"\(64\.0 KiB\): give \(min, max\)$"),
    ({"readahead": (1, 2, 3)}, r"^readahead must be True, False or \(min, max\) window sizes"),
    ({"log_faults": -5}, r"^log_faults must be between 0 and 4194304, not -5$"),
    ({"threads": 0}, r"^threads must be between 1 and 64, not 0$"),
    ({"threads": 65}, r"^threads must be between 1 and 64, not 65$"),
    ({"retries": -1}, r"^retries must be between 0 and 100, not -1$"),
    ({"timeout": 0}, r"^timeout must be a number of seconds in \(0, 86400\], not 0$"),
    ({"timeout": float("nan")}, r"^timeout must be a number of seconds"),
    ({"on_error": "ignore"}, r"^on_error must be one of poison, retry, zero, not 'ignore'$"),
    ({"on_remove": "keep"}, r"^on_remove must be one of reload, zero, not 'keep'$"),
    ({"piece": 5000}, r"^piece must be a multiple of 4096 bytes, not 5000$"),
    ({"populate": "yes"}, r"^populate must be True or False, not 'yes'$"),
    ({"max_restarts": -1}, r"^max_restarts must be between 0 and 10000, not -1$"),
])
def test_every_bad_option_is_named_with_its_range(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ServeConfig(**options)
    with pytest.raises(ValueError, match=message):  # the same check, before anything is mapped
        userfault.map(userfault.ZeroSource(1 << 20), **options)


def test_sizes_strings_and_page_rounding() -> None:
    c = ServeConfig(chunk="64K", readahead=("128KiB", "8M"), piece="1M")
    assert (c.chunk, c.readahead, c.piece) == (64 << 10, (128 << 10, 8 << 20), 1 << 20)
    assert ServeConfig(readahead=False).readahead == (0, 0)
    assert ServeConfig(readahead=True).readahead == (64 << 10, 4 << 20)
    assert ServeConfig(chunk=5000).for_page(4096) == (8192, 64 << 10, 4 << 20)
    assert ServeConfig().for_page(2 << 20) == (2 << 20, 2 << 20, 4 << 20)


def test_the_config_is_frozen_and_crosses_processes_as_itself() -> None:
    c = ServeConfig(chunk="16K", on_error="retry", timeout=2.5)
    with pytest.raises(AttributeError):
        c.chunk = 0  # type: ignore[misc]
    back = pickle.loads(pickle.dumps(c))
    assert back == c and type(back) is ServeConfig


def test_bounds_come_from_the_engine() -> None:
    from userfault.serving import config

    assert (config.MAX_THREADS, config.MAX_CHUNK, config.MAX_LOG) == (
        _native.UF_MAX_THREADS, _native.UF_MAX_CHUNK, _native.UF_MAX_LOG)
    assert userfault.FileSource.kind == _native.SRC_MEMORY
    assert _native.COUNTER_NAMES[0] == "faults" and "restarts" in _native.COUNTER_NAMES


# -- user-written sources --------------------------------------------------------------------

_SCRIPT = """
    import hashlib
    import userfault

    class Squares:                      # a PageSource defined in the script itself
        size = 1 << 20

        def read_into(self, offset, buf):
            for i in range(len(buf)):
                buf[i] = ((offset + i) * (offset + i)) & 0xFF

    if __name__ == "__main__":
        with userfault.map(Squares(), readahead=False) as p:
            assert p.runtime == "process"
            got = hashlib.sha256(memoryview(p)).hexdigest()
        want = hashlib.sha256(bytes((i * i) & 0xFF for i in range(1 << 20))).hexdigest()
        print("same" if got == want else "different")
"""


def test_a_source_defined_in_the_script_works(tmp_path: Path) -> None:
    script = tmp_path / "app.py"
    script.write_text(textwrap.dedent(_SCRIPT))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       timeout=60, cwd="/")
    assert (r.returncode, r.stdout.strip()) == (0, "same"), r.stderr


def test_a_source_in_a_module_beside_the_script_run_from_elsewhere(tmp_path: Path) -> None:
    app = tmp_path / "app"
    app.mkdir()
    (app / "mysource.py").write_text(textwrap.dedent("""
        class Ones:
            size = 1 << 16

            def read_into(self, offset, buf):
                buf[:] = b"\\x01" * len(buf)
    """))
    (app / "main.py").write_text(textwrap.dedent("""
        import userfault
        from mysource import Ones
        if __name__ == "__main__":
            with userfault.map(Ones()) as p:
                print(sum(memoryview(p)))
    """))
    r = subprocess.run([sys.executable, "app/main.py"], capture_output=True, text=True,
                       timeout=60, cwd=tmp_path)
    assert (r.returncode, r.stdout.strip()) == (0, str(1 << 16)), r.stderr


def test_mapping_at_import_time_is_refused_with_the_fix(tmp_path: Path) -> None:
    script = tmp_path / "noguard.py"
    script.write_text(textwrap.dedent(_SCRIPT).replace('if __name__ == "__main__":', "if True:"))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1
    assert "put the code that maps memory under `if __name__ == '__main__':`" in r.stderr


def test_a_class_from_an_interactive_session_is_refused_clearly() -> None:
    r = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import userfault
        class Local:
            size = 4096
            def read_into(self, offset, buf):
                buf[:] = bytes(len(buf))
        try:
            userfault.map(Local())
        except userfault.PagerError as err:
            print(err)
    """)], capture_output=True, text=True, timeout=60)
    assert "Local is defined in __main__ of an interactive session or `python -c`, which " \
           "the pager process cannot import: define the class in a .py file" in r.stdout
