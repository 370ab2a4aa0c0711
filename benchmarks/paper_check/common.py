"""What every claim script shares: its command line (--quick, --out) and writing figures safely."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from eva_lora._atomic import atomic_path

RESULTS = Path(__file__).parent / "results"


def claim_args(doc: str, argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="reduced form, run by the test suite")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the .md, .json and .png results")
    return parser.parse_args(argv)


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: Path) -> None:
    """Temporary file, then rename: a killed run never leaves half a figure."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)
