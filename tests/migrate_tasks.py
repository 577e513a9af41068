"""Both ends of a migration, as processes for the tests (``python migrate_tasks.py send|receive``).

The sender fills a region with seeded random bytes, writes it at a controlled rate while it
migrates (a seeded sequence of 8-byte stamps), stops the writer in the pause hook, and may then
dirty ``--burst`` more pages (so that the post-copy has that much to move). :func:`expected`
rebuilds the final contents from the seed and the counts the sender prints, so the test checks
the destination's bytes against contents it computed itself.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import sys
import threading
import time
from collections.abc import Iterator

import numpy as np

PAGE = 4096
STAMP = 8


def initial(size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)


def stamps(size: int, seed: int, writes: int, burst: int) -> Iterator[tuple[int, bytes]]:
    """Where each write of the sender went, in order, and what it wrote."""
    rng = random.Random(seed)
    pages = size // PAGE
    for i in range(writes):
        p = rng.randrange(pages)
        yield p * PAGE + (i % (PAGE // STAMP)) * STAMP, i.to_bytes(STAMP, "little")
    for p in range(burst):
        yield p * PAGE + 16, b"BURST%03d" % (p % 1000)


def expected(size: int, seed: int, writes: int, burst: int) -> str:
    """The blake2b digest the region must have at the end."""
    mem = initial(size, seed)
    for off, data in stamps(size, seed, writes, burst):
        mem[off:off + STAMP] = np.frombuffer(data, np.uint8)
    return hashlib.blake2b(mem.data, digest_size=32).hexdigest()


def send(args: argparse.Namespace) -> int:
    from userfault import Region
    from userfault.migrate import MigrationSender
    from userfault.remote import load_secret

    region = Region.anonymous(args.size)
    view = np.frombuffer(memoryview(region), np.uint8)
    view[:] = initial(args.size, args.seed)
    stop, stopped = threading.Event(), threading.Event()
    writes = 0
    plan = iter(stamps(args.size, args.seed, 1 << 40, 0))

    def writer() -> None:
        nonlocal writes
        t0 = time.monotonic()
        while not stop.is_set():
            off, data = next(plan)
            view[off:off + STAMP] = np.frombuffer(data, np.uint8)
            writes += 1
            ahead = writes / args.rate - (time.monotonic() - t0)
            if ahead > 0:
                stop.wait(min(ahead, 0.01))
        stopped.set()

    def pause() -> None:
        stop.set()
        stopped.wait()
        for off, data in stamps(args.size, args.seed, 0, args.burst):
            view[off:off + STAMP] = np.frombuffer(data, np.uint8)
        print("paused", flush=True)

    sender = MigrationSender(region, secret=load_secret(args.secret_file), name="mem",
                             pause=pause, max_rounds=args.max_rounds, max_dirty=args.max_dirty)
    ep = sender.start(args.listen)[0]
    if args.rate:
        threading.Thread(target=writer, daemon=True).start()
    else:
        stopped.set()
    print(f"listening on {ep}", flush=True)
    report = sender.wait()
    print(json.dumps({"writes": writes, "report": report.as_dict()}), flush=True)
    sender.close()
    return 0


def receive(args: argparse.Namespace) -> int:
    from userfault.migrate import receive as receive_region

    with receive_region(args.url, secret_file=args.secret_file,
                        reconnect_timeout=args.reconnect_timeout, digest=True) as incoming:
        assert incoming.memory is not None
        print("running", flush=True)
        with memoryview(incoming.memory) as mem:
            if args.touch:  # fault on the pages dirtied at the stop, while post-copy runs
                sys.stdin.readline()
                total = 0
                for p in range(args.touch):
                    total += mem[p * PAGE + 16]
                print(f"touched {total}", flush=True)
            report = incoming.wait()
            digest = hashlib.blake2b(mem, digest_size=32).hexdigest()
        incoming.verify()
        print(json.dumps({"digest": digest, "report": report.as_dict()}), flush=True)
    return 0


def main() -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(name)s: %(levelname)s %(message)s")
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("send")
    s.add_argument("--listen", required=True)
    s.add_argument("--secret-file", required=True)
    s.add_argument("--size", type=int, required=True)
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--rate", type=float, default=0, help="pages written a second")
    s.add_argument("--burst", type=int, default=0, help="pages dirtied in the pause hook")
    s.add_argument("--max-rounds", type=int, default=8)
    s.add_argument("--max-dirty", type=int, default=1 << 20)
    s.set_defaults(func=send)
    r = sub.add_parser("receive")
    r.add_argument("url")
    r.add_argument("--secret-file", required=True)
    r.add_argument("--reconnect-timeout", type=float, default=30.0)
    r.add_argument("--touch", type=int, default=0,
                   help="after a line on stdin, read this many pages from the start")
    r.set_defaults(func=receive)
    args = parser.parse_args()
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
