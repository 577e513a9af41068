"""`userfault features`: what this kernel offers, and what to change where it refuses."""

from __future__ import annotations

import os
import stat
from typing import Any

from . import _native
from ._flags import Feature, Ioctl, RegisterMode
from .errors import PermissionDeniedError, UffdError
from .region import HUGE_PAGE_SIZE, Region, hugepages_free
from .uffd import PAGE_SIZE, Uffd, offered_features

__all__ = ["format_report", "probe"]

_MODES = {"missing": RegisterMode.MISSING, "wp": RegisterMode.WP, "minor": RegisterMode.MINOR}


def _names(flags: int, enum: type[Feature] | type[Ioctl]) -> list[str]:
    return [str(f.name) for f in enum if f & flags]


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _creation() -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for method, opener in (("dev", _native.open_dev), ("syscall", _native.open_syscall)):
        for umo in (False, True):
            fd, err = opener(os.O_CLOEXEC | (int(_native.UFFD_USER_MODE_ONLY) if umo else 0))
            key = method + (" user-mode-only" if umo else "")
            paths[key] = {"ok": fd >= 0, "error": None if fd >= 0 else os.strerror(err)}
            if fd >= 0:
                os.close(fd)
    return paths


def _memory_types() -> dict[str, Any]:
    result: dict[str, Any] = {}
    makers: list[tuple[str, Any]] = [("anonymous", lambda: Region.anonymous(PAGE_SIZE)),
                                     ("shmem", lambda: Region.shared_memfd(PAGE_SIZE))]
    if hugepages_free() >= 1:
        makers.append(("hugetlb", lambda: Region.hugetlb(HUGE_PAGE_SIZE)))
    else:
        result["hugetlb"] = {"skipped": "no free huge pages: `echo 1 > /proc/sys/vm/nr_hugepages` "
                                        "to probe hugetlb"}
    for name, make in makers:
        modes: dict[str, Any] = {}
        for mode_name, mode in _MODES.items():
            try:
                with make() as region, Uffd() as uffd:
                    ioctls = uffd.register(region.address, region.size, mode)
                modes[mode_name] = _names(ioctls, Ioctl)
            except UffdError as err:
                modes[mode_name] = {"error": str(err)}
        result[name] = modes
    return result


def probe() -> dict[str, Any]:
    """Probe the kernel: creation paths, feature bits, ioctls per memory type, settings."""
    report: dict[str, Any] = {"kernel": os.uname().release, "creation": _creation()}
    dev = "/dev/userfaultfd"
    try:
        st = os.stat(dev)
        report["dev_userfaultfd"] = {"exists": True, "mode": oct(stat.S_IMODE(st.st_mode)),
                                     "uid": st.st_uid, "gid": st.st_gid}
    except OSError:
        report["dev_userfaultfd"] = {"exists": False}
    unpriv = _read("/proc/sys/vm/unprivileged_userfaultfd")
    report["unprivileged_userfaultfd"] = None if unpriv is None else int(unpriv)
    report["euid"] = os.geteuid()
    try:
        try:
            feats, ioctls = offered_features()
            report["handshake"] = "full"
        except PermissionDeniedError:
            feats, ioctls = offered_features(user_mode_only=True)
            report["handshake"] = "user-mode-only"
        report["features"] = _names(feats, Feature)
        report["missing_features"] = [str(f.name) for f in Feature if not f & feats]
        report["api_ioctls"] = _names(ioctls, Ioctl)
        report["memory_types"] = _memory_types()
    except UffdError as err:
        report["error"] = str(err)
    report["hugepages_free"] = hugepages_free()
    report["advice"] = _advice(report)
    return report


def _advice(report: dict[str, Any]) -> list[str]:
    advice = []
    creation = report["creation"]
    if not creation["dev"]["ok"] and not creation["syscall"]["ok"]:
        if creation["syscall user-mode-only"]["ok"] or creation["dev user-mode-only"]["ok"]:
            advice.append("only user-mode faults can be handled: pass user_mode_only=True (the "
                          "default falls back to it), or set `sysctl vm.unprivileged_userfaultfd=1`"
                          " / give this user read-write access to /dev/userfaultfd for kernel-mode "
                          "faults (needed for Firecracker and read() into registered memory)")
        else:
            advice.append("userfaultfd is unavailable: check CONFIG_USERFAULTFD, seccomp filters "
                          "(containers often block the syscall) and /dev/userfaultfd permissions")
    elif not creation["dev"]["ok"]:
        advice.append("/dev/userfaultfd is not usable by this user (the syscall works); "
                      "`chmod 0666 /dev/userfaultfd` or a udev rule grants it")
    if report.get("hugepages_free", 0) == 0:
        advice.append("no huge pages reserved: hugetlb regions need "
                      "`echo N > /proc/sys/vm/nr_hugepages`")
    return advice


def format_report(report: dict[str, Any]) -> str:
    """The probe as readable text."""
    lines = [f"kernel {report['kernel']}, euid {report['euid']}, "
             f"vm.unprivileged_userfaultfd = {report['unprivileged_userfaultfd']}"]
    dev = report["dev_userfaultfd"]
    lines.append("/dev/userfaultfd: " + (f"mode {dev['mode']} uid {dev['uid']} gid {dev['gid']}"
                                         if dev["exists"] else "missing"))
    lines.append("creation paths:")
    for name, res in report["creation"].items():
        lines.append(f"  {name:<24} {'ok' if res['ok'] else 'refused: ' + str(res['error'])}")
    if "error" in report:
        lines.append(f"handshake failed: {report['error']}")
    else:
        lines.append(f"handshake: {report['handshake']}")
        lines.append(f"features offered ({len(report['features'])}): "
                     + " ".join(report["features"]))
        if report["missing_features"]:
            lines.append("features missing: " + " ".join(report["missing_features"]))
        lines.append("ioctls per memory type and register mode:")
        for mem, modes in report["memory_types"].items():
            if "skipped" in modes:
                lines.append(f"  {mem:<10} skipped: {modes['skipped']}")
                continue
            for mode, res in modes.items():
                text = " ".join(res) if isinstance(res, list) else "refused: " + res["error"]
                lines.append(f"  {mem:<10} {mode:<8} {text}")
    lines.append(f"huge pages free: {report['hugepages_free']}")
    for tip in report["advice"]:
        lines.append(f"advice: {tip}")
    return "\n".join(lines)
