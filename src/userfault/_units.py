"""Sizes: parsing ``"64K"``-style strings and printing byte counts for humans."""

from __future__ import annotations

import argparse
from typing import Final

__all__ = ["human", "parse_size", "size_arg"]

_SUFFIXES: Final = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """Parse ``"4096"``, ``"64K"``, ``"1M"``, ``"2GiB"``... (binary multiples) into bytes."""
    s = text.strip().upper().replace(" ", "")
    for tail in ("IB", "B"):
        if s.endswith(tail) and len(s) > len(tail):
            s = s[: -len(tail)]
            break
    suffix = s[-1:] if s[-1:] in _SUFFIXES else ""
    number = s[: len(s) - len(suffix)]
    try:
        value = float(number) * _SUFFIXES[suffix] if "." in number else \
            int(number) * _SUFFIXES[suffix]
    except ValueError:
        raise ValueError(f"invalid size {text!r}: use bytes or a K, M, G suffix") from None
    if value < 0:
        raise ValueError(f"invalid size {text!r}: negative")
    return int(value)


def size_arg(text: str) -> int:
    """:func:`parse_size` as an argparse ``type=`` (errors become usage errors)."""
    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def human(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover
