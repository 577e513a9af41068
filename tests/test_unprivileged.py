"""The unprivileged path: a forked child drops root and still serves user-mode faults."""

from __future__ import annotations

import json
import os
import threading

import pytest

from userfault import PAGE_SIZE, PermissionDeniedError, Region, Uffd, _native
from userfault.features import format_report, probe

pytestmark = pytest.mark.timeout(30)


def drop_privileges() -> None:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)


@pytest.fixture(autouse=True)
def _need_root_and_the_default_sysctl() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to drop privileges")
    with open("/proc/sys/vm/unprivileged_userfaultfd") as f:
        if f.read().strip() != "0":
            pytest.skip("vm.unprivileged_userfaultfd is not 0 here")


def test_unprivileged_falls_back_to_user_mode_only(child) -> None:
    def body(wfd: int) -> None:
        drop_privileges()
        report: dict[str, object] = {"uid": os.getuid()}
        with Uffd() as u, Region.anonymous(PAGE_SIZE) as r:
            report["user_mode_only"] = u.user_mode_only
            u.register(r.address, r.size)
            sums: list[int] = []
            t = threading.Thread(
                target=lambda: sums.append(_native.touch(r.address, 1, 1, 0, 0, False)))
            t.start()
            event = u.read_event(timeout=10)
            report["fault"] = event is not None and event.address == r.address
            u.copy(r.address, b"\x07" * PAGE_SIZE)
            t.join(10)
            report["read"] = sums
        try:
            Uffd(user_mode_only=False)
        except PermissionDeniedError as err:
            report["denied"] = str(err)
            report["errno"] = err.errno
        os.write(wfd, json.dumps(report).encode())

    status, out = child(body)
    assert os.waitstatus_to_exitcode(status) == 0, out
    report = json.loads(out)
    assert report["uid"] == 65534
    assert report["user_mode_only"] is True
    assert report["fault"] is True and report["read"] == [7]
    assert report["errno"] == 1  # EPERM
    assert "vm.unprivileged_userfaultfd" in report["denied"]
    assert "user_mode_only=True" in report["denied"]
    assert "/dev/userfaultfd" in report["denied"]


def test_probe_as_an_unprivileged_user_gives_advice(child) -> None:
    def body(wfd: int) -> None:
        drop_privileges()
        report = probe()
        os.write(wfd, json.dumps({"report": report, "text": format_report(report)}).encode())

    status, out = child(body)
    assert os.waitstatus_to_exitcode(status) == 0, out
    got = json.loads(out)
    creation = got["report"]["creation"]
    assert not creation["dev"]["ok"] and not creation["syscall"]["ok"]
    assert creation["syscall user-mode-only"]["ok"]
    assert got["report"]["euid"] == 65534
    assert any("only user-mode faults can be handled" in a for a in got["report"]["advice"])
    assert "advice: only user-mode faults can be handled" in got["text"]
