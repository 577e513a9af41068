"""The IntFlag values against the constants compiled into the C extension and the header."""

from __future__ import annotations

import enum
import re
from pathlib import Path

import pytest

from userfault import (
    ContinueMode,
    CopyMode,
    FaultFlag,
    Feature,
    Ioctl,
    MoveMode,
    PageCategory,
    PoisonMode,
    RegisterMode,
    ScanFlag,
    WriteProtectMode,
    ZeropageMode,
    _events,
    _native,
)

PREFIXES: list[tuple[type[enum.IntFlag], str]] = [
    (Feature, "UFFD_FEATURE_"), (RegisterMode, "UFFDIO_REGISTER_MODE_"),
    (CopyMode, "UFFDIO_COPY_MODE_"), (ZeropageMode, "UFFDIO_ZEROPAGE_MODE_"),
    (WriteProtectMode, "UFFDIO_WRITEPROTECT_MODE_"), (ContinueMode, "UFFDIO_CONTINUE_MODE_"),
    (PoisonMode, "UFFDIO_POISON_MODE_"), (MoveMode, "UFFDIO_MOVE_MODE_"),
    (FaultFlag, "UFFD_PAGEFAULT_FLAG_"), (ScanFlag, "PM_SCAN_"), (PageCategory, "PAGE_IS_"),
]


def expected(cls: type[enum.IntFlag], prefix: str) -> dict[str, int]:
    return {prefix + str(m.name): int(m) for m in cls}


@pytest.mark.parametrize(("cls", "prefix"), PREFIXES, ids=[c.__name__ for c, _ in PREFIXES])
def test_flags_equal_the_compiled_constants(cls: type[enum.IntFlag], prefix: str) -> None:
    for name, value in expected(cls, prefix).items():
        assert getattr(_native, name) == value, name


def test_ioctl_bits_are_the_ioctl_numbers() -> None:
    for member in Ioctl:
        nr = getattr(_native, f"_UFFDIO_{member.name}")
        assert int(member) == 1 << nr, member.name
        if member.name != "API":
            request = getattr(_native, f"UFFDIO_{member.name}")
            assert (request & 0xFF, (request >> 8) & 0xFF) == (nr, 0xAA), member.name


def test_events_and_sizes() -> None:
    for kind in ("PAGEFAULT", "FORK", "REMAP", "REMOVE", "UNMAP"):
        assert getattr(_events, f"EVENT_{kind}") == getattr(_native, f"UFFD_EVENT_{kind}")
    assert _events.MSG_SIZE == _native.MSG_SIZE == 32
    assert _native.UFFD_API == 0xAA
    assert Feature(0x1FFFF) == sum(Feature)  # 17 bits, no gaps


def header_values(path: Path) -> dict[str, int]:
    """``#define NAME value`` lines whose value is a plain integer expression."""
    values = {}
    for name, expr in re.findall(r"^#define\s+(\w+)\s+(.+?)\s*(?:/\*.*)?$", path.read_text(),
                                 re.M):
        expr = re.sub(r"\(__u64\)", "", expr)
        if re.fullmatch(r"[\s()0-9xXa-fA-F<|]+", expr):
            values[name] = int(eval(expr))  # digits, shifts and parentheses only
    return values


def test_flags_equal_the_installed_header() -> None:
    header = Path("/usr/include/linux/userfaultfd.h")
    if not header.exists():
        pytest.skip("no /usr/include/linux/userfaultfd.h (install linux-libc-dev)")
    values = header_values(header)
    fs = Path("/usr/include/linux/fs.h")
    if fs.exists():
        values.update(header_values(fs))
    compared = 0
    for cls, prefix in PREFIXES:
        for name, value in expected(cls, prefix).items():
            if name in values:  # Debian 12's header lacks MOVE, POISON, WP_ASYNC, PAGEMAP_SCAN
                assert values[name] == value, name
                compared += 1
    for member in Ioctl:
        if f"_UFFDIO_{member.name}" in values:
            assert int(member) == 1 << values[f"_UFFDIO_{member.name}"]
            compared += 1
    assert compared >= 25
