"""What a sandboxed run may use and what it reports: the limits, their checks, the result."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Status = Literal["passed", "failed", "timeout", "error"]
Tier = Literal["root-namespaces", "user-namespaces", "none"]

# "auto" (default): strongest that works here; "guard": no namespaces
ISOLATION_ENV = "EVA_SANDBOX_ISOLATION"
_MiB = 1024 * 1024
# each private tmpfs holds this many maximal files: bounds disk/RAM use, not just file size
_TMPFS_FACTOR = 4
_DRAIN_GRACE_S = 0.5  # after the kill, how long to wait for the pipes to reach EOF
_POLL_S = 0.05  # only used where pidfd_open is unavailable
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_UID_RANGE = (1_500_000_000, 2_000_000_000)  # fresh uids: far above any real account
# wait at most ~1 s (plus scans) for killed processes to go
_SWEEP_ROUNDS, _SWEEP_PAUSE_S = 100, 0.01


# ---------------------------------------------------------------- validation


def _check_number(name: str, value: object, types_: tuple[type, ...]) -> None:
    if isinstance(value, bool) or not isinstance(value, types_):
        wanted = " or ".join(t.__name__ for t in types_)
        raise TypeError(f"SandboxLimits.{name} must be {wanted}, got {type(value).__name__}")


def _check_program(name: str, program: object) -> None:
    if not isinstance(program, str):
        raise TypeError(f"{name} must be str (Python source), got {type(program).__name__}")


def _check_limits(limits: object) -> None:
    if not isinstance(limits, SandboxLimits):
        raise TypeError(f"limits must be a SandboxLimits, got {type(limits).__name__}")


@dataclass(frozen=True)
class SandboxLimits:
    """What one candidate may use. Defaults suit HumanEval/MBPP: seconds of pure Python, no I/O.

    ``processes`` counts processes (and threads) *beyond the interpreter itself*: the default 0 lets
    a completion neither fork nor start threads. It is enforced by ``RLIMIT_NPROC``, which counts
    every process of the child's uid: exact where the child gets its own uid (root-namespaces tier),
    stricter (no fork at all) for a non-root user who already runs other processes, and not at all
    for root (the kernel exempts it), where only the guard and the group kill remain.
    """

    timeout_s: float = 10.0
    cpu_s: int = 10
    memory_mb: int = 1024
    file_size_mb: int = 16
    processes: int = 0
    open_files: int = 64
    output_kb: int = 64

    def __post_init__(self) -> None:
        _check_number("timeout_s", self.timeout_s, (int, float))
        if not math.isfinite(self.timeout_s) or self.timeout_s <= 0:
            raise ValueError(
                f"SandboxLimits.timeout_s must be a finite number > 0, got {self.timeout_s!r}"
            )
        for name in ("cpu_s", "memory_mb", "file_size_mb", "open_files", "output_kb"):
            value = getattr(self, name)
            _check_number(name, value, (int,))
            if value <= 0:
                raise ValueError(f"SandboxLimits.{name} must be > 0, got {value!r}")
        _check_number("processes", self.processes, (int,))
        if self.processes < 0:
            raise ValueError(f"SandboxLimits.processes must be >= 0, got {self.processes!r}")


DEFAULT_LIMITS = SandboxLimits()


@dataclass(frozen=True)
class ExecutionResult:
    """Outcome of one candidate.

    ``status``: "passed" (exit code 0 *and* the per-run nonce came back, i.e. the tests ran to the
    end), "failed" (an assertion or other exception, a non-zero exit, an early ``exit()``, a missing
    nonce, a limit hit), "timeout" (wall clock; ``returncode`` is then None) or "error" (the harness
    itself could not run the child; never the candidate's fault). ``stdout``/``stderr`` hold at most
    ``SandboxLimits.output_kb`` KiB each; ``truncated`` says whether either was cut.
    """

    status: Status
    returncode: int | None
    seconds: float
    stdout: str
    stderr: str
    truncated: bool

    @property
    def passed(self) -> bool:
        return self.status == "passed"
