"""The application on top of the core: models, data, tasks, init registry, recipes, plots, CLI.

Needs the ``recipes`` extra (``pip install 'eva-lora[recipes]'``): transformers, PEFT, datasets,
accelerate, PyYAML, scikit-learn, SciPy, matplotlib, math-verify. The core (``eva_lora``) never
imports this package.
"""

from __future__ import annotations

import importlib.util

RECIPES_EXTRA = ("transformers", "peft", "datasets", "yaml", "accelerate")


def missing_extras() -> list[str]:
    """Modules of the ``recipes`` extra that are not installed."""
    return [name for name in RECIPES_EXTRA if importlib.util.find_spec(name) is None]
