"""What every claim script shares: its command line (--quick, --out), figures (the app's plotting
helpers) and its ending: JSON + markdown written atomically, the markdown printed."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from eva_lora.app.plots import pyplot, save_figure
from eva_lora.files import atomic_write_text

RESULTS = Path(__file__).parent / "results"


def claim_args(doc: str, argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="reduced form, run by the test suite")
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help="folder for the .md, .json and .png results"
    )
    return parser.parse_args(argv)


def grid_parser(doc: str, name: str, quick_help: str) -> argparse.ArgumentParser:
    """The command line of a resumable seed grid: --quick, --seeds, --out, and --work (where each
    run's files live, so a finished run is reused); scripts add their own options."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--work",
        type=Path,
        default=Path(__file__).resolve().parents[2] / "out" / "paper_check" / name,
    )
    return parser


__all__ = [
    "RESULTS",
    "SHARED_DATA",
    "TEST_DATA",
    "resolve_data_dir",
    "claim_args",
    "code_files",
    "grid_parser",
    "made_by",
    "made_by_runs",
    "oldest_commit",
    "record_made_by",
    "provenance",
    "pyplot",
    "save_png",
    "united_code_files",
    "write_results",
]

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"  # the full data sets (../shared/data)
TEST_DATA = REPO / "tests" / "assets" / "data"  # the slices --quick runs on
# --quick stops EVA on MiniLM after this many batches, converged or not: the test suite checks a
# script's plumbing, the full run its numbers (converging takes ~70 batches of 16 sentences)
QUICK_EVA_BATCHES = 16


def resolve_data_dir(
    parser: argparse.ArgumentParser, args: argparse.Namespace, folder: str
) -> None:
    """``args.data_dir``: as given, else the full data (the test slices with --quick); it must
    hold ``folder``/, or the command line is refused before any work."""
    if args.data_dir is None:
        args.data_dir = TEST_DATA if args.quick else SHARED_DATA
    if not (args.data_dir / folder).is_dir():
        parser.error(
            f"no {folder}/ folder under --data-dir {args.data_dir}; pass a folder laid out like "
            "../shared/data"
        )


# what a result depends on when it does not say which of the package's modules made it: a change
# anywhere here makes it stale
CODE_PATHS = ("src/eva_lora",)


def git(*args: str) -> str | None:
    """Output of a git command in this repository, or None (no git, not a checkout)."""
    import subprocess

    try:
        done = subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def provenance() -> dict[str, Any]:
    """What made a result: the commit (and whether the code had uncommitted changes), library
    versions, the date. ``report.py`` compares the commit with the last change to the code."""
    import datetime

    from eva_lora.loop_utils import versions

    dirty = git("status", "--porcelain", "--", *CODE_PATHS)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return {
        "git_commit": git("rev-parse", "HEAD"),
        "code_changes_uncommitted": None if dirty is None else bool(dirty),
        "versions": versions(),
        "date": now,
    }


def code_files() -> list[str] | None:
    """The package's Python files this process has loaded, as paths in the repository, or None when
    the package was not imported from this checkout (an installed copy: then every file counts).

    Asked when a run ends, so modules imported lazily during it are in the list: a change to a
    module no run loaded (sequential EVA's onloading under a Meta-World grid, say) does not make the
    result stale, a change to one they ran does. Only a script that records it for every run it
    reads back may pass it on (:func:`write_results`): a process that reads finished runs back
    did not load the code that made them."""
    import sys

    package = (REPO / CODE_PATHS[0]).resolve()
    name = package.name  # the import name: only its modules can live in the package's folder
    loaded = set()
    # resolving every loaded module's path took ~1 s a call (thousands of modules), once per run
    for module_name, module in list(sys.modules.items()):
        if module_name != name and not module_name.startswith(name + "."):
            continue
        file = getattr(module, "__file__", None)
        if not file:
            continue
        path = Path(file).resolve()
        if path.is_relative_to(package):
            loaded.add(path.relative_to(REPO.resolve()).as_posix())
    return sorted(loaded) or None


def united_code_files(lists: list[list[str] | None]) -> list[str] | None:
    """The package's files the processes that made a grid's runs loaded, united; None when a run
    does not say (a run stored before runs recorded it): the result then depends on the whole
    package."""
    if not lists or any(not files for files in lists):
        return None
    return sorted({f for files in lists for f in files})


def oldest_commit(commits: list[str | None]) -> str | None:
    """The earliest of the commits that made a grid's runs (a grid resumed over sittings, or made
    by shards, spans several): the result is as old as its oldest run. None when a run does not
    say."""
    if not commits or None in commits:
        return None
    oldest = None
    for commit in set(commits):
        if oldest is None or git("merge-base", "--is-ancestor", commit, oldest) is not None:
            oldest = commit
    return oldest


# beside a run's files: the commit and the package modules of the process that trained it
MADE_BY_FILE = "made_by.json"


def record_made_by(folder: Path) -> dict[str, Any]:
    """Write (and return) what made the run just trained into ``folder``: this process's commit at
    its start and the modules it has loaded. A grid that reads the run back later takes them from
    there (:func:`made_by`), not from the process that reads it."""
    made = {"git_commit": provenance_at_start()["git_commit"], "code_files": code_files()}
    atomic_write_text(folder / MADE_BY_FILE, json.dumps(made))
    return made


def made_by(folder: Path) -> dict[str, Any] | None:
    """What :func:`record_made_by` wrote for a finished run, or None (a run from before runs
    recorded it: a grid trains it again rather than guess what made it)."""
    file = folder / MADE_BY_FILE
    return json.loads(file.read_text()) if file.is_file() else None


def made_by_runs(made: list[dict[str, Any]]) -> dict[str, Any]:
    """:func:`write_results`' ``made_at`` and ``code_used`` for a grid whose runs each recorded what
    made them (:func:`record_made_by`): its oldest run's commit, the modules its runs loaded."""
    return {
        "made_at": oldest_commit([m.get("git_commit") for m in made]),
        "code_used": united_code_files([m.get("code_files") for m in made]),
    }


def save_png(fig: Any, path: Path) -> None:
    save_figure(fig, path, dpi=110)


_AT_START: dict[str, Any] = {}


def provenance_at_start() -> dict[str, Any]:
    """:func:`provenance` as it was when this process first asked (scripts ask when they start): an
    hour-long grid is made by the code it started with, whatever is committed while it runs."""
    if not _AT_START:
        _AT_START.update(provenance())
    return dict(_AT_START)


def write_results(
    out: Path,
    stem: str,
    record: dict[str, Any],
    markdown: str,
    made_at: str | None = None,
    code_used: list[str] | None = None,
) -> None:
    """``<stem>.json`` and ``<stem>.md`` under ``out`` (atomically), then the markdown on stdout.
    The provenance is the one at the script's start; a commit made while it ran is named too.
    ``made_at``: the commit that made the oldest of the runs a resumed grid read back, when older
    than the script's start (the result is as old as its oldest run). ``code_used``: the package's
    files the processes that made the runs loaded (:func:`code_files`, united over the runs);
    without it the result depends on the whole package."""
    out.mkdir(parents=True, exist_ok=True)
    made = provenance_at_start()
    if made_at and made_at != made["git_commit"]:
        made["git_commit_assembled_at"] = made["git_commit"]
        made["git_commit"] = made_at
    now = git("rev-parse", "HEAD")
    if now != made["git_commit"]:
        made["git_commit_when_written"] = now
    if code_used:
        made["code_files"] = sorted(set(code_used))
    record = {**record, "provenance": made}
    atomic_write_text(out / f"{stem}.json", json.dumps(record, indent=1))
    atomic_write_text(out / f"{stem}.md", markdown)
    print(markdown)


provenance_at_start()  # a script imports this module when it starts
