"""The containment this machine allows: namespaces, a fresh uid, or the guard alone; probed once."""

from __future__ import annotations

import functools
import os
import shutil
import sys
import threading
from dataclasses import dataclass
from typing import Literal

from .limits import _PATH, ISOLATION_ENV, SandboxLimits, Tier


@dataclass(frozen=True)
class Isolation:
    """Which kernel facilities contain the child (see :func:`isolation`).

    ``tier``: "root-namespaces" (root: network + PID + mount namespaces, private tmpfs, fresh uid),
    "user-namespaces" (non-root with unprivileged user namespaces: the same without the fresh uid,
    so the child can still write wherever the calling user can) or "none" (only the process/rlimit
    boundary and the in-process guard). ``read_capability``: the fresh uid keeps CAP_DAC_READ_SEARCH
    because it could not otherwise even start the interpreter (e.g. Python under a 0700 /root); it
    may then *read* any file, but still write none.
    """

    tier: Tier
    read_capability: bool = False

    @property
    def network(self) -> Literal["namespace", "guard"]:
        return "guard" if self.tier == "none" else "namespace"

    @property
    def namespaces(self) -> bool:
        return self.tier != "none"

    @property
    def separate_uid(self) -> bool:
        return self.tier == "root-namespaces"


GUARD_ONLY = Isolation("none")


def isolation() -> Isolation:
    """The strongest containment that works on this machine, probed once (a few 100 ms) and cached.

    Set ``EVA_SANDBOX_ISOLATION=guard`` to skip the namespaces (e.g. to debug the fallback).
    """
    choice = os.environ.get(ISOLATION_ENV, "auto")
    if choice == "guard":
        return GUARD_ONLY
    if choice != "auto":
        raise ValueError(f"{ISOLATION_ENV} must be 'auto' or 'guard', got {choice!r}")
    return _probed_isolation()


def network_isolation() -> Literal["namespace", "guard"]:
    """Which network containment is in force.

    "namespace": the child has its own network namespace (only a down loopback): real containment.
    "guard": Python-level socket functions raise; C code (ctypes) could still reach the network.
    """
    return isolation().network


# ---------------------------------------------------------------- isolation probing

_PROBE_TESTS = r"""
import socket, sys
print("PYTHON", sys.version.replace("\n", " "), sys.base_prefix)
status = dict(
    line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line
)
print("UIDS", *status["Uid"].split())
print("CAPS", status["CapEff"].strip())
print("IFACES", *sorted(name for _, name in socket.if_nameindex()))
"""
_PROBE_LIMITS = SandboxLimits(timeout_s=20.0)
_CAP_NONE, _CAP_READ_SEARCH = "0000000000000000", "0000000000000004"
_probe_lock = threading.Lock()


@functools.lru_cache(maxsize=1)
def _tools() -> tuple[str, str] | None:
    """Absolute paths of util-linux's ``unshare`` and ``setpriv``, or None."""
    unshare, setpriv = shutil.which("unshare", path=_PATH), shutil.which("setpriv", path=_PATH)
    return (unshare, setpriv) if unshare and setpriv else None


def _probed_isolation() -> Isolation:
    with _probe_lock:
        return _probe_once()


@functools.lru_cache(maxsize=1)
def _probe_once() -> Isolation:
    for candidate in _candidates():
        if _probe(candidate):
            return candidate
    return GUARD_ONLY


def _python_identity() -> str:
    return f"{sys.version.replace(chr(10), ' ')} {sys.base_prefix}"


def _candidates() -> list[Isolation]:
    if _tools() is None or not sys.platform.startswith("linux"):
        return []
    strongest = [Isolation("root-namespaces"), Isolation("root-namespaces", read_capability=True)]
    return [*(strongest if os.geteuid() == 0 else []), Isolation("user-namespaces")]


def _probe(candidate: Isolation) -> bool:
    """Run a real job under ``candidate``; check the child's uids, capabilities and interfaces."""
    from .parent import _execute  # the parent side starts runs; it needs this module first

    result = _execute("", _PROBE_TESTS, _PROBE_LIMITS, candidate)
    if not result.passed:
        return False
    seen = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)
    if seen.get("IFACES") != "lo" or seen.get("PYTHON") != _python_identity():
        # no private network, or another interpreter (e.g. a fallback libpython) started
        return False
    if not candidate.separate_uid:
        return True
    uids = set(seen.get("UIDS", "0").split())
    caps = _CAP_READ_SEARCH if candidate.read_capability else _CAP_NONE
    return len(uids) == 1 and "0" not in uids and seen.get("CAPS") == caps
