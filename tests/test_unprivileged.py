"""The unprivileged path: a forked child drops root and still serves user-mode faults."""

from __future__ import annotations

import errno
import json
import os
import sys
import threading
import warnings

import pytest

import userfault
from userfault import PAGE_SIZE, PermissionDeniedError, Region, Uffd, UserModeOnlyWarning, _native
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


def test_fallback_warns_once_naming_the_consequence_and_the_fix(child) -> None:
    """The fallback is silent no more: one UserModeOnlyWarning per process, pointing at the
    caller's line, and what it announces happens: os.write() from an unloaded page of a
    ``userfault.map`` fails with EFAULT while a user-mode read of the same page works."""
    def body(wfd: int) -> None:
        drop_privileges()
        report: dict[str, object] = {}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            Uffd(user_mode_only=True).close()  # chosen explicitly: no warning
            report["explicit"] = len(caught)
            line = _line() + 1  # the warning names the next line
            Uffd().close()
            Uffd().close()
            pager = userfault.map(b"u" * (1 << 20), readahead=False)
        report["warnings"] = [(w.category.__name__, str(w.message), w.filename, w.lineno)
                              for w in caught]
        report["line"] = line
        _, w = os.pipe()
        try:
            os.write(w, memoryview(pager)[8 * PAGE_SIZE: 9 * PAGE_SIZE])  # kernel-mode read
        except OSError as err:
            report["write_errno"] = err.errno
        report["user_read"] = bytes(memoryview(pager)[8 * PAGE_SIZE: 8 * PAGE_SIZE + 2]).decode()
        pager.close()
        os.write(wfd, json.dumps(report).encode())

    status, out = child(body)
    assert os.waitstatus_to_exitcode(status) == 0, out
    report = json.loads(out)
    assert report["explicit"] == 0
    assert len(report["warnings"]) == 1, report["warnings"]
    category, message, filename, lineno = report["warnings"][0]
    assert category == UserModeOnlyWarning.__name__
    assert message == (
        "userfaultfd: this process may not handle kernel-mode faults, so userfault falls back "
        "to user-mode-only fault handling (UFFD_USER_MODE_ONLY). Consequence: a kernel-mode "
        "access to a page that is not loaded yet, such as os.write() from it or read()/recv() "
        "into it, fails with EFAULT instead of waiting for the page. Fix: `sysctl "
        "vm.unprivileged_userfaultfd=1`, or read/write access to /dev/userfaultfd for this "
        "user; pass user_mode_only=True to choose this mode without the warning")
    assert (filename, lineno) == (__file__, report["line"])  # the caller, not userfault's code
    assert report["write_errno"] == errno.EFAULT
    assert report["user_read"] == "uu"


def test_map_warns_at_the_callers_line(child) -> None:
    def body(wfd: int) -> None:
        drop_privileges()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            line = _line() + 1
            pager = userfault.map(b"m" * PAGE_SIZE)  # map -> Pager -> Uffd: warned here
        pager.close()
        os.write(wfd, json.dumps({"line": line, "at": [[w.filename, w.lineno] for w in caught
                                                       if w.category is UserModeOnlyWarning]}
                                 ).encode())

    status, out = child(body)
    assert os.waitstatus_to_exitcode(status) == 0, out
    got = json.loads(out)
    assert got["at"] == [[__file__, got["line"]]]


def _line() -> int:
    """The line number of the caller's call."""
    return sys._getframe(1).f_lineno
