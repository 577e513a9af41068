"""Model weights on demand: a safetensors checkpoint loaded lazily over HTTP (or Redis, or a
compressed snapshot) through ``userfault.map``; only the tensors you read travel.

    # write a checkpoint of float16 tensors (needs the safetensors package), then serve it
    # with an HTTP server that honours Range requests (nginx, for example):
    python examples/weights_over_http.py --make ckpt.safetensors --size 256M
    python examples/weights_over_http.py http://127.0.0.1:8080/ckpt.safetensors
    python examples/weights_over_http.py http://127.0.0.1:8080/ckpt.safetensors \\
        --check ckpt.safetensors                   # compare every tensor byte for byte
    # every tensor is hinted (Pager.willneed) in file order after the header; --no-willneed
    # leaves it to readahead behind the faults

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON (name ->
dtype, shape, [begin, end) offsets relative to the end of the header), then the raw tensors.
:class:`LazyCheckpoint` parses that header from the mapped memory (faulting in its first
pages only) and gives numpy views of the tensors: a view costs nothing until it is read,
:meth:`LazyCheckpoint.prefetch` installs a set of tensors in one batch first, and
``LazyCheckpoint(url, willneed=True)`` (or :meth:`LazyCheckpoint.willneed`) has the pager's
background threads fetch the tensors in the order they will be read, ahead of the reader.
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import sys
import time
from collections.abc import Iterable
from typing import Any

import numpy as np

import userfault

#: safetensors dtype names -> numpy (BF16 has no numpy dtype: its raw 16-bit words)
DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
          "BOOL": np.bool_}


def make_checkpoint(path: str, size: int, seed: int = 0) -> dict[str, tuple[int, ...]]:
    """Write a transformer-shaped checkpoint of about ``size`` bytes of float16 tensors
    (embedding, per layer attention and MLP weights and norms) with ``safetensors``; return
    the shapes by name."""
    from safetensors.numpy import save_file

    dim = max(64, 2 ** math.floor(math.log2(math.sqrt(size / (24 * 16)))))  # >= 16 layers
    per_layer = 2 * (12 * dim * dim + 2 * dim)
    layers = max(1, round((size - 2 * 16 * dim * dim) / per_layer))
    rng = np.random.default_rng(seed)
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (8 * dim, dim)}
    for i in range(layers):
        p = f"layers.{i}."
        shapes.update({p + "attn_norm.weight": (dim,), p + "attn.q.weight": (dim, dim),
                       p + "attn.k.weight": (dim, dim), p + "attn.v.weight": (dim, dim),
                       p + "attn.o.weight": (dim, dim), p + "mlp_norm.weight": (dim,),
                       p + "mlp.up.weight": (4 * dim, dim), p + "mlp.down.weight": (dim, 4 * dim)})
    shapes["lm_head.weight"] = (8 * dim, dim)
    tensors = {name: (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)
               for name, shape in shapes.items()}
    save_file(tensors, path, metadata={"made_by": "userfault examples/weights_over_http.py"})
    return shapes


def parse_header(head: memoryview) -> tuple[int, dict[str, dict[str, Any]]]:
    """``(data_start, tensors)`` from the start of a safetensors file: ``tensors[name]`` has
    ``dtype``, ``shape`` and ``data_offsets`` (relative to ``data_start``)."""
    if len(head) < 8:
        raise ValueError("too short for a safetensors file")
    (n,) = struct.unpack_from("<Q", head)
    if n > 100 << 20 or 8 + n > len(head):
        raise ValueError(f"implausible safetensors header length {n}")
    doc = json.loads(bytes(head[8: 8 + n]))
    doc.pop("__metadata__", None)
    return 8 + n, doc


class LazyCheckpoint:
    """A safetensors checkpoint mapped with ``userfault.map``: tensors as lazy numpy views.

    Example::

        with LazyCheckpoint("http://host/model.safetensors") as ckpt:
            w = ckpt.tensor("layers.0.attn.q.weight")   # nothing fetched yet
            print(float(w[0, 0]))                        # now its first page is
    """

    def __init__(self, source: Any, *, willneed: Iterable[str] | bool = False,
                 **pager_options: Any) -> None:
        self.pager = userfault.map(source, **pager_options)
        self._view = memoryview(self.pager)
        self.data_start, self.entries = parse_header(self._view)
        self.names = sorted(self.entries, key=lambda k: self.entries[k]["data_offsets"][0])
        if willneed:
            self.willneed(self.names if willneed is True else willneed)

    def byte_range(self, name: str) -> tuple[int, int]:
        """``(offset, length)`` of a tensor's bytes in the file."""
        begin, end = self.entries[name]["data_offsets"]
        return self.data_start + begin, end - begin

    def tensor(self, name: str) -> np.ndarray[Any, Any]:
        """A numpy view of the tensor (read-only memory served on first touch)."""
        e = self.entries[name]
        offset, length = self.byte_range(name)
        dtype = np.dtype(DTYPES[e["dtype"]])
        return np.frombuffer(self._view, dtype=dtype, count=length // dtype.itemsize,
                             offset=offset).reshape(e["shape"])

    def prefetch(self, names: Iterable[str]) -> int:
        """Install these tensors' bytes now, in one batch; returns bytes installed."""
        return self.pager.prefetch([self.byte_range(n) for n in names])

    def willneed(self, names: Iterable[str]) -> int:
        """Start fetching these tensors in the background, in this order (the order a loader
        will read them), and return at once (``Pager.willneed``); returns bytes queued."""
        return self.pager.willneed([self.byte_range(n) for n in names])

    def close(self) -> None:
        self._view.release()
        self.pager.close()

    def __enter__(self) -> LazyCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_all(ckpt: LazyCheckpoint, names: Iterable[str]) -> float:
    """Copy every named tensor out of the mapping (what a loader does on its way to the
    device); returns the seconds until the first one was complete."""
    t0 = time.perf_counter()
    first = 0.0
    for i, name in enumerate(names):
        np.array(ckpt.tensor(name), copy=True)
        if i == 0:
            first = time.perf_counter() - t0
    return first


def check(ckpt: LazyCheckpoint, path: str) -> list[str]:
    """Names of the tensors whose bytes differ from ``safetensors.numpy.load_file(path)``."""
    from safetensors.numpy import load_file

    ref = load_file(path)
    wrong = [n for n in ckpt.names if ckpt.tensor(n).tobytes() != ref[n].tobytes()]
    missing = sorted(set(ref) - set(ckpt.names))
    return wrong + missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("source", nargs="?", help="URL (http://, redis://) or path of the file")
    parser.add_argument("--make", metavar="FILE", help="write a checkpoint and exit")
    parser.add_argument("--size", default="64M", help="checkpoint size for --make (64M)")
    parser.add_argument("--no-willneed", action="store_true",
                        help="do not hint the tensors ahead (readahead behind the faults only)")
    parser.add_argument("--check", metavar="FILE",
                        help="compare every tensor with this local copy (safetensors.load_file)")
    args = parser.parse_args(argv)
    if args.make:
        from userfault._units import parse_size

        shapes = make_checkpoint(args.make, parse_size(args.size))
        print(f"wrote {args.make}: {len(shapes)} float16 tensors")
        return 0
    if not args.source:
        parser.error("give a source (or --make FILE)")
    t0 = time.perf_counter()
    with LazyCheckpoint(args.source, willneed=not args.no_willneed) as ckpt:
        t_header = time.perf_counter() - t0
        t_first = read_all(ckpt, ckpt.names)
        t_all = time.perf_counter() - t0
        stats = ckpt.pager.stats()
        total = ckpt.pager.size
        print(f"{len(ckpt.names)} tensors, {total / 2**20:.1f} MiB: header parsed in "
              f"{t_header * 1e3:.1f} ms, first tensor after {(t_header + t_first) * 1e3:.1f} ms, "
              f"all tensors after {t_all:.2f} s ({total / t_all / 2**20:.0f} MiB/s)")
        print(f"fetched {stats.bytes_installed / 2**20:.1f} MiB in {stats.faults} faults")
        if args.check:
            wrong = check(ckpt, args.check)
            if wrong:
                print(f"MISMATCH in {len(wrong)} tensors: {', '.join(wrong[:5])}")
                return 1
            print(f"all {len(ckpt.names)} tensors byte-exact against {args.check}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
