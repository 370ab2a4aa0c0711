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
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="reduced form, run by the test suite")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the .md, .json and .png results")
    return parser.parse_args(argv)


def grid_parser(doc: str, name: str, quick_help: str) -> argparse.ArgumentParser:
    """The command line of a resumable seed grid: --quick, --seeds, --out, and --work (where each run's
    files live, so a finished run is reused); scripts add their own options."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--work", type=Path, default=Path(__file__).resolve().parents[2] / "out" / "paper_check" / name)
    return parser


__all__ = ["RESULTS", "claim_args", "grid_parser", "pyplot", "save_png", "write_results"]


def save_png(fig: Any, path: Path) -> None:
    save_figure(fig, path, dpi=110)


def write_results(out: Path, stem: str, record: dict[str, Any], markdown: str) -> None:
    """``<stem>.json`` and ``<stem>.md`` under ``out`` (atomically), then the markdown on stdout."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"{stem}.json", json.dumps(record, indent=1))
    atomic_write_text(out / f"{stem}.md", markdown)
    print(markdown)
