"""The parent side: start one contained child, feed it, watch it, kill it, judge it."""

from __future__ import annotations

import functools
import marshal
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
from collections.abc import Sequence

from . import child
from .child import _BOOTSTRAP
from .isolation import Isolation, _tools, isolation
from .limits import (
    _DRAIN_GRACE_S,
    _PATH,
    _POLL_S,
    _SWEEP_PAUSE_S,
    _SWEEP_ROUNDS,
    _TMPFS_FACTOR,
    _UID_RANGE,
    DEFAULT_LIMITS,
    ExecutionResult,
    SandboxLimits,
    _check_limits,
    _check_program,
    _MiB,
)


def run_program(
    completion_program: str, test_program: str, limits: SandboxLimits = DEFAULT_LIMITS
) -> ExecutionResult:
    """Run ``completion_program``, then (builtins and preloaded modules restored) ``test_program``.

    Why two programs: the completion is the untrusted part; the tests are trusted and must see the
    interpreter as it was before the completion ran. Both run in one child; see the module
    docstring.
    """
    _check_program("completion_program", completion_program)
    _check_program("test_program", test_program)
    _check_limits(limits)
    return _execute(completion_program, test_program, limits, isolation())


def run_many(
    jobs: Sequence[tuple[str, str]], limits: SandboxLimits = DEFAULT_LIMITS, workers: int = 2
) -> list[ExecutionResult]:
    """Run ``(completion_program, test_program)`` pairs, ``workers`` at once; results in job order.

    Threads only wait on child processes, so the GIL is no bottleneck. Every job is validated
    before the first one starts.
    """
    if not isinstance(jobs, Sequence) or isinstance(jobs, (str, bytes)):
        raise TypeError(
            "jobs must be a list of (completion_program, test_program) pairs, got "
            f"{type(jobs).__name__}"
        )
    for index, job in enumerate(jobs):
        if not isinstance(job, tuple) or len(job) != 2:
            raise TypeError(
                f"jobs[{index}] must be a (completion_program, test_program) tuple, got {job!r:.80}"
            )
        _check_program(f"jobs[{index}][0]", job[0])
        _check_program(f"jobs[{index}][1]", job[1])
    _check_limits(limits)
    if isinstance(workers, bool) or not isinstance(workers, int):
        raise TypeError(f"workers must be an int, got {type(workers).__name__}")
    if workers <= 0:
        raise ValueError(f"workers must be >= 1, got {workers}")
    # here: the child, which imports this module, never needs it
    from concurrent.futures import ThreadPoolExecutor

    chosen = isolation()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox") as pool:
        return list(pool.map(lambda job: _execute(job[0], job[1], limits, chosen), jobs))


# ---------------------------------------------------------------- parent side: one run


class _Capture:
    """The first ``cap`` bytes of a stream; the rest is drained so the child never blocks."""

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
            uid = _UID_RANGE[0] + int.from_bytes(os.urandom(4), "big") % (
                _UID_RANGE[1] - _UID_RANGE[0]
            )
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
        return ExecutionResult(
            "error", None, time.monotonic() - start, "", f"sandbox error: {exc!r}", False
        )
    finally:
        run.close()
        _remove_tree(workdir)
        if uid is not None:
            _release_uid(uid)


def _encode_job(job: dict, nonce: bytes) -> bytes:
    """What the child reads from its payload pipe, in order: the child module's compiled code
    (loaded by ``_BOOTSTRAP``), the job, and only after the tests have run, the nonce. Lengths are
    16 ASCII digits."""
    code, body = _child_code(), marshal.dumps(job)
    return b"%016d" % len(code) + code + b"%016d" % len(body) + body + nonce


@functools.lru_cache(maxsize=1)
def _child_code() -> bytes:
    """The child module (:mod:`.child`, and nothing else of the package), compiled once by the
    parent: the child neither compiles (no bytecode cache is written when PYTHONDONTWRITEBYTECODE is
    set) nor needs read access to the source file."""
    with open(child.__file__, encoding="utf-8") as handle:
        return marshal.dumps(compile(handle.read(), child.__file__, "exec", dont_inherit=True))


class _Run:
    """A child process: its pipes, its captured output, and what it takes to judge and clean it up.

    File descriptors live in ``self.fds`` and are closed exactly once (``_close``): with
    ``run_many`` another thread may reuse a number as soon as it is closed.
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
            # No preexec_fn: Python code between fork and exec of a parent with
            # threads (torch's, run_many's) can deadlock or crash the child,
            # and Popen then waits forever. The child sets its own limits.
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
        return ExecutionResult(
            status, returncode, seconds, self.out.text(), self.err.text(), truncated
        )

    def _pump(
        self, selector: selectors.BaseSelector, streams: dict[int, _Capture], deadline: float
    ) -> bool:
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
                for key, _ in selector.select(
                    remaining if exit_fd is not None else min(remaining, _POLL_S)
                ):
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
        # the child died before reading everything: its exit status says why
        except BrokenPipeError:
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
    """(resource, (soft, hard)) pairs, clamped to the current hard limits (raising needs privilege).

    The child applies them (:func:`_apply_limits`) before it runs a line of the completion. They are
    hard limits too, and the child never holds CAP_SYS_RESOURCE in the initial namespace (except in
    tier "none" run as root), so the completion cannot raise them again.
    """
    wanted = [
        # SIGXCPU first, SIGKILL a second later
        (resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 1)),
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
size="$1"; work="$2"; owner="$3"; root="$4"; shown="$5"; shift 5
for dir in /tmp /var/tmp /dev/shm /run/lock; do
  if [ -d "$dir" ] && [ ! -L "$dir" ]; then
    mount -t tmpfs -o "size=$size,mode=1777,nosuid,nodev" sandbox-tmp "$dir"
  fi
done
mkdir -p "$work"
mount -t tmpfs -o "size=$size,mode=0700,nosuid,nodev$owner" sandbox-work "$work"
# A minimal root: only the interpreter, its libraries and the work folder,
# read-only but for the latter.
mkdir -p "$root"
mount -t tmpfs -o "size=1m,mode=0755,nosuid" sandbox-root "$root"
i=0
while [ "$i" -lt "$shown" ]; do
  path="$1"; shift; i=$((i + 1))
  mkdir -p "$root$(dirname "$path")"
  if [ -L "$path" ]; then
    ln -s "$(readlink "$path")" "$root$path"
  elif [ -d "$path" ]; then
    mkdir -p "$root$path"
    mount --rbind "$path" "$root$path"
    mount -o remount,bind,ro "$root$path"
  elif [ -e "$path" ]; then
    touch "$root$path"
    mount --bind "$path" "$root$path"
    mount -o remount,bind,ro "$root$path"
  fi
done
mkdir -p "$root/dev" "$root/proc" "$root/tmp"
for device in null zero random urandom; do
  touch "$root/dev/$device"
  mount --bind "/dev/$device" "$root/dev/$device"
done
mount -t proc sandbox-proc "$root/proc"
mount -t tmpfs -o "size=$size,mode=1777,nosuid,nodev" sandbox-tmp "$root/tmp"
mkdir -p "$root$work"
mount --rbind "$work" "$root$work"
exec chroot "$root" /bin/sh -c 'cd "$0" && exec "$@"' "$work" "$@"
"""
_ROOT = "/tmp/.eva-sandbox-root"  # inside the child's private /tmp


def shown_paths() -> list[str]:
    """What the child's file system holds besides its work folder: the interpreter, its standard
    library and shared libraries, the system's programs and libraries (``/usr``; ``/bin`` and
    ``/lib`` as on this machine) and the loader's cache; everything read-only. Not there: ``/home``,
    ``/root``, ``/etc`` (but ``ld.so.cache``), ``/srv``, ``/var``, ``/opt`` and the caller's
    folders, unless the interpreter itself lives there (then only its own prefix)."""
    import sysconfig

    paths = ["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc/ld.so.cache"]
    python = os.path.realpath(sys.executable)
    for extra in (
        os.path.dirname(python),
        os.path.realpath(sys.base_prefix),
        sysconfig.get_config_var("LIBDIR") or "",
    ):
        if extra and not any(extra == p or extra.startswith(p + "/") for p in paths):
            paths.append(extra)
    return [p for p in paths if os.path.lexists(p)]


def _command(
    iso: Isolation, workdir: str, uid: int | None, limits: SandboxLimits, payload_fd: int
) -> list[str]:
    safe_path = ["-P"] if sys.version_info >= (3, 11) else []
    # The real interpreter, not a venv link: a venv under /tmp
    # would be hidden by the private tmpfs on /tmp.
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
    shown = shown_paths()
    setup = [
        "sh",
        "-c",
        _SETUP,
        "sandbox-setup",
        size,
        workdir,
        owner,
        _ROOT,
        str(len(shown)),
        *shown,
    ]
    return [
        setpriv,
        "--pdeathsig=KILL",
        "--",
        unshare,
        *flags,
        "--",
        *setup,
        *_drop(setpriv, iso, uid),
        *python,
    ]


def _drop(setpriv: str, iso: Isolation, uid: int | None) -> list[str]:
    """setpriv arguments (last step before the interpreter): fresh uid if any, no new privileges."""
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
    """After the kill: read what is left until EOF (every writer dead) or the grace period ends."""
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
    alive when the result is returned. A pidfd pins each pid before it is checked (no pid-reuse
    race).
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
