"""Pre-registered plans: what an experiment runs and how it is judged, fixed before its results.

Each experiment of this folder that makes a claim has ``plans/<name>.json``: its tasks, seeds,
methods, episodes or items, and the test that decides the verdict. The script reads its grid from
the plan (so the two cannot differ) and stamps the result with the plan's SHA-256
(:func:`stamp`).
``report.py`` accepts a result only when (:func:`check`)

- the plan file as it is now has the stamped hash (the plan did not change after the result), and
- the commit that made the result (its provenance) already holds the plan with that hash (the plan
  was committed before the result was made, not written to fit it).

A result that fails either is refused: its verdict is not computed, the report says why.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from common import REPO

PLANS = Path(__file__).parent / "plans"


def plan_path(name: str) -> Path:
    return PLANS / f"{name}.json"


def load(name: str) -> dict[str, Any]:
    """The plan ``name`` (plans/<name>.json)."""
    path = plan_path(name)
    if not path.is_file():
        raise FileNotFoundError(
            f"no plan {path}: write and commit it before running the experiment"
        )
    return json.loads(path.read_text())


def digest(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


def stamp(name: str) -> dict[str, str]:
    """What a result records of its plan: the name, the file, the SHA-256 of its bytes."""
    path = plan_path(name)
    return {
        "name": name,
        "file": str(path.resolve().relative_to(REPO)),
        "sha256": digest(path.read_bytes()),
    }


def check(record: dict[str, Any]) -> str | None:
    """None when the record's plan stands, else why the record is refused."""
    plan = record.get("plan")
    if not plan:
        return "no pre-registered plan recorded (made before plans existed): rerun under its plan"
    path = REPO / plan["file"]
    if not path.is_file():
        return f"its plan {plan['file']} no longer exists"
    if digest(path.read_bytes()) != plan["sha256"]:
        return f"its plan {plan['file']} changed after the result was made"
    commit = (record.get("provenance") or {}).get("git_commit")
    if not commit:
        return "the result records no commit, so the plan's date cannot be checked"
    committed = committed_bytes(commit, plan["file"])
    if committed is None:
        return f"the plan was not committed when the result was made (commit {commit[:10]})"
    if digest(committed) != plan["sha256"]:
        return f"commit {commit[:10]} holds another version of the plan than the one stamped"
    return None


def committed_bytes(commit: str, file: str) -> bytes | None:
    """The bytes of ``file`` at ``commit``, or None (not there, no git)."""
    import subprocess

    try:
        done = subprocess.run(
            ["git", "-C", str(REPO), "show", f"{commit}:{file}"], capture_output=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None
